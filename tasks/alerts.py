"""Alerts: which model, which version, what crossed which threshold -- to the log, email, Slack.

* ``log``: a WARNING line in the flow run's log (the Prefect UI shows it);
* ``slack``: a message posted through prefect-slack's ``SlackWebhook`` (it posts to the URL it is
  given, so a loopback server can receive it in tests; Prefect's core SlackWebhook block would go
  through apprise to a hard-coded hooks.slack.com address, docs/architecture.md);
* ``email``: prefect-email's ``email_send_message`` over ``EmailServerCredentials``.

The webhook URL and the SMTP password come from the monitoring policy (``SecretStr`` fields, or
saved blocks referenced by name); they are never logged: error messages from the channels are
redacted before anyone sees them. A failing channel does not stop the others (each is its own task
run, retried twice) and does not undo the check that raised the alert: the flow reports it in the
result's ``alert_errors`` and in the log.
"""
from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any, Literal

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from blocks.monitoring import MonitoringPolicy
from tasks.errors import MlopsError

AlertKind = Literal["drift", "performance", "retraining"]


class AlertDeliveryError(MlopsError, RuntimeError):
    """A channel refused or could not take the alert (the message says which and why)."""


@dataclass
class Alert:
    """One alert: a subject line and the facts (each line names a value and its threshold)."""

    kind: AlertKind
    model_name: str
    version: int
    subject: str
    reasons: list[str]
    details: list[str] = field(default_factory=list)
    link: str | None = None

    def text(self) -> str:
        lines = [self.subject, "", *[f"- {r}" for r in self.reasons]]
        if self.details:
            lines += ["", *self.details]
        if self.link:
            lines += ["", f"details: {self.link}"]
        return "\n".join(lines)

    def html(self) -> str:
        items = "".join(f"<li>{html.escape(r)}</li>" for r in self.reasons)
        details = "".join(f"<p>{html.escape(d)}</p>" for d in self.details)
        link = f'<p><a href="{html.escape(self.link)}">details</a></p>' if self.link else ""
        return f"<h3>{html.escape(self.subject)}</h3><ul>{items}</ul>{details}{link}"

    def slack_blocks(self) -> list[dict[str, Any]]:
        body = "\n".join(f"• {r}" for r in self.reasons)
        blocks: list[dict[str, Any]] = [
            {"type": "header", "text": {"type": "plain_text", "text": self.subject[:150]}},
            {"type": "section", "text": {"type": "mrkdwn", "text": body[:3000]}},
        ]
        context = [*self.details, *([f"<{self.link}|details>"] if self.link else [])]
        if context:
            blocks.append({"type": "context", "elements": [
                {"type": "mrkdwn", "text": c[:300]} for c in context[:10]]})
        return blocks


# --------------------------------------------------------------------------- deciding (pure)
def drift_alert(model_name: str, version: int, score: float, drifted_features: list[str],
                policy: MonitoringPolicy, data_ref: str | None = None,
                link: str | None = None) -> Alert | None:
    """The drift alert when the score is above ``policy.drift_alert_threshold``, else None."""
    if not policy.alerting or score <= policy.drift_alert_threshold:
        return None
    top = ", ".join(drifted_features[:8]) + (" …" if len(drifted_features) > 8 else "")
    return Alert(
        kind="drift", model_name=model_name, version=version,
        subject=f"[mlops] drift alert: {model_name} v{version} drift score {score:.2f} > "
                f"{policy.drift_alert_threshold:.2f}",
        reasons=[f"model drift score {score:.3f} is above drift_alert_threshold "
                 f"{policy.drift_alert_threshold:.2f} (drifted at drift_threshold "
                 f"{policy.drift_threshold:.2f})",
                 f"drifted features ({len(drifted_features)}): {top or 'none'}"],
        details=[f"data checked: {data_ref or 'a DataFrame'}"], link=link)


def performance_alert(model_name: str, version: int, reasons: list[str], policy: MonitoringPolicy,
                      data_ref: str | None = None, n_rows: int | None = None,
                      link: str | None = None) -> Alert | None:
    """The performance alert when any threshold was crossed (``reasons`` non-empty), else None."""
    if not policy.alerting or not reasons:
        return None
    return Alert(
        kind="performance", model_name=model_name, version=version,
        subject=f"[mlops] performance alert: {model_name} v{version} degraded",
        reasons=list(reasons),
        details=[f"labelled data: {data_ref or 'a DataFrame'}"
                 + (f" ({n_rows} rows)" if n_rows is not None else "")], link=link)


def retraining_alert(model_name: str, version: int, promoted: bool, decision: str, why: str,
                     policy: MonitoringPolicy, details: list[str] | None = None,
                     link: str | None = None) -> Alert | None:
    """A retraining's outcome: a promotion, or a challenger the gate (or a person) refused."""
    if not policy.alerting:
        return None
    outcome = ("promoted to champion" if promoted else "not promoted" if decision == "not_promoted"
               else f"not promoted ({decision.replace('_', ' ')})")
    return Alert(kind="retraining", model_name=model_name, version=version,
                 subject=f"[mlops] retraining: {model_name} v{version} {outcome}",
                 reasons=[why], details=list(details or []), link=link)


# --------------------------------------------------------------------------- secrets
def _secrets(policy: MonitoringPolicy, extra: list[str] | None = None) -> list[str]:
    values = [s.get_secret_value() for s in (policy.slack_webhook_url, policy.smtp_password) if s]
    return [v for v in values + list(extra or []) if v]


def redact(text: str, secrets: list[str]) -> str:
    """``text`` with every secret (and, for URLs, their path) replaced by ``***``."""
    out = str(text)
    for secret in sorted(set(secrets), key=len, reverse=True):
        if secret:
            out = out.replace(secret, "***")
    return out


# --------------------------------------------------------------------------- channels
def _slack_webhook(policy: MonitoringPolicy):
    from prefect_slack import SlackWebhook

    if policy.slack_webhook_url:
        return SlackWebhook(url=policy.slack_webhook_url)
    return SlackWebhook.load(policy.slack_webhook_block)


def _email_credentials(policy: MonitoringPolicy):
    from prefect_email import EmailServerCredentials

    if policy.email_credentials_block:
        return EmailServerCredentials.load(policy.email_credentials_block)
    kwargs: dict[str, Any] = {"smtp_server": policy.smtp_server, "smtp_type": policy.smtp_type,
                              "smtp_port": policy.smtp_port, "username": policy.smtp_username}
    if policy.smtp_password:
        kwargs["password"] = policy.smtp_password
    return EmailServerCredentials(**kwargs)


def send_slack(alert: Alert, policy: MonitoringPolicy) -> None:
    webhook = _slack_webhook(policy)
    secrets = _secrets(policy, [webhook.url.get_secret_value()])
    try:
        response = webhook.get_client(sync_client=True).send(text=alert.text(),
                                                             blocks=alert.slack_blocks())
    except Exception as exc:  # urllib/socket errors: say what failed, never where it was sent
        raise AlertDeliveryError(redact(f"Slack webhook unreachable: {type(exc).__name__}: {exc}",
                                        secrets)) from None
    if response.status_code >= 400:
        raise AlertDeliveryError(redact(f"Slack webhook answered HTTP {response.status_code}: "
                                        f"{str(response.body)[:200]}", secrets))


def send_email(alert: Alert, policy: MonitoringPolicy) -> None:
    from prefect.utilities.asyncutils import run_coro_as_sync
    from prefect_email import email_send_message

    credentials = _email_credentials(policy)
    secrets = _secrets(policy, [credentials.password.get_secret_value()])
    try:
        run_coro_as_sync(email_send_message.fn(
            subject=alert.subject, msg=alert.html(), msg_plain=alert.text(),
            email_server_credentials=credentials, email_from=policy.email_from,
            email_to=list(policy.email_to)))
    except Exception as exc:
        raise AlertDeliveryError(redact(f"email via {credentials.smtp_server!s} failed: "
                                        f"{type(exc).__name__}: {exc}", secrets)) from None


@task(name="send-alert", task_run_name="alert-{channel}", retries=2, retry_delay_seconds=1,
      cache_policy=NO_CACHE)
def send_alert(alert: Alert, channel: str, policy: MonitoringPolicy) -> str:
    """Deliver one alert on one channel; returns the channel name."""
    if channel == "log":
        get_run_logger().warning("%s", alert.text())
    elif channel == "slack":
        send_slack(alert, policy)
    elif channel == "email":
        send_email(alert, policy)
    else:  # the policy's Literal type keeps this out; be explicit anyway
        raise AlertDeliveryError(f"unknown alert channel {channel!r}; use log, email or slack")
    return channel


def dispatch(alert: Alert | None, policy: MonitoringPolicy) -> tuple[list[str], list[str]]:
    """Send ``alert`` on every channel of the policy: ``(channels reached, errors)``.

    Call it from a flow. Each channel is a task run (retried); a failed one is reported, the
    others still go.
    """
    if alert is None or not policy.alerting:
        return [], []
    logger = get_run_logger()
    sent, errors = [], []
    for channel in policy.channels:
        state = send_alert(alert, channel, policy, return_state=True)
        if state.is_completed():
            sent.append(channel)
        else:
            try:
                state.result()
                message = "failed"
            except Exception as exc:  # the task's exception, already redacted
                message = redact(str(exc), _secrets(policy))
            errors.append(f"{channel}: {message}")
            logger.error("alert on channel %s failed: %s", channel, message)
    return sent, errors
