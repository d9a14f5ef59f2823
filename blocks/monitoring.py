"""The monitoring policy as a Prefect block: drift and performance thresholds, alert channels.

Resolution order (like `resolve_mlflow_config`): a saved `MonitoringPolicy` document named by the
caller, else the one named `default`, else the embedded defaults below (alerts to the log only).
A saved document that does not validate is a ConfigurationError, never skipped.

Secrets -- the Slack webhook URL and the SMTP password -- are `SecretStr` fields (the Prefect UI
and API show them masked) or references to saved prefect-slack `SlackWebhook` / prefect-email
`EmailServerCredentials` documents by name. They are never logged nor written to artifacts.
"""
from __future__ import annotations

from typing import Literal

from prefect.blocks.core import Block
from pydantic import Field, SecretStr, field_validator, model_validator

from blocks.documents import load_saved
from tasks.errors import ConfigurationError

DEFAULT_DOCUMENT = "default"
Channel = Literal["log", "email", "slack"]


class MonitoringPolicy(Block):
    """When a model counts as drifted or degraded, and whom to tell."""

    _block_type_name = "Monitoring Policy"
    _block_type_slug = "mlops-monitoring-policy"
    _description = ("Drift and performance thresholds and alert channels (log, email, Slack) used "
                    "by check_drift and evaluate_production.")

    # --- drift -------------------------------------------------------------------------------
    drift_threshold: float = Field(
        default=0.3, ge=0.0, le=1.0,
        description="A check is `drifted` when the model drift score (importance-weighted share "
                    "of drifted features, in [0, 1]) is above this.")
    drift_alert_threshold: float = Field(
        default=0.5, ge=0.0, le=1.0,
        description="Alert when the model drift score is above this.")
    feature_alpha: float = Field(
        default=0.05, gt=0.0, lt=1.0,
        description="Significance level of the per-feature test (KS for numeric features, "
                    "chi-squared for categorical ones).")
    min_effect_numeric: float = Field(
        default=0.1, ge=0.0,
        description="A numeric feature drifts only if it also moved at least this far "
                    "(Wasserstein distance in reference standard deviations): keeps "
                    "statistically significant but tiny shifts of large batches out.")
    min_effect_categorical: float = Field(
        default=0.035, ge=0.0, le=1.0,
        description="Same for categorical features, as a Jensen-Shannon distance (base 2); 0.035 "
                    "is a 50/50 split moving by 5 points.")
    # --- performance -------------------------------------------------------------------------
    accuracy_alert_threshold: float = Field(
        default=0.8, ge=0.0, le=1.0,
        description="Classification: alert when accuracy on labelled production data is below.")
    r2_alert_threshold: float = Field(
        default=0.5, le=1.0,
        description="Regression counterpart: alert when R² on labelled production data is below.")
    max_relative_degradation: float = Field(
        default=0.1, ge=0.0,
        description="Also degraded when the version's primary metric is worse than its holdout "
                    "value by more than this share (0.1 = 10 %).")
    # --- served traffic and /metrics ---------------------------------------------------------
    served_sample_rate: float = Field(
        default=0.1, ge=0.0, le=1.0,
        description="Share of the rows the REST service answers whose features are kept for "
                    "drift checks on served traffic (data reference served:<model>:<window>); "
                    "0 keeps none.")
    served_retention_days: float | None = Field(
        default=30.0, gt=0,
        description="prune_prediction_log deletes sampled served rows older than this; empty: "
                    "no age limit.")
    served_max_rows: int | None = Field(
        default=1_000_000, ge=1,
        description="prune_prediction_log keeps at most this many sampled served rows per model "
                    "(the newest); empty: no row limit.")
    metrics_cache_seconds: float = Field(
        default=30.0, gt=0,
        description="How long /metrics serves the drift, accuracy and retraining figures it read "
                    "from MLflow before reading them again.")
    # --- alerts ------------------------------------------------------------------------------
    alerting: bool = Field(default=True, description="Send alerts at all.")
    channels: list[Channel] = Field(default_factory=lambda: ["log"],
                                    description="Where alerts go: log, email, slack.")
    slack_webhook_url: SecretStr | None = Field(
        default=None, description="Slack incoming-webhook URL (secret).")
    slack_webhook_block: str | None = Field(
        default=None, description="Or: name of a saved prefect-slack SlackWebhook document.")
    email_to: list[str] = Field(default_factory=list, description="Alert recipients.")
    email_from: str | None = Field(default=None, description="Sender; the SMTP user when empty.")
    smtp_server: str | None = Field(default=None, description="SMTP host name.")
    smtp_port: int | None = Field(default=None, description="SMTP port; the type's default when empty.")
    smtp_type: Literal["SSL", "STARTTLS", "INSECURE"] = Field(
        default="STARTTLS", description="SSL (465), STARTTLS (587) or INSECURE (25, tests only).")
    smtp_username: str | None = Field(default=None, description="SMTP login user, if any.")
    smtp_password: SecretStr | None = Field(default=None, description="SMTP password (secret).")
    email_credentials_block: str | None = Field(
        default=None,
        description="Or: name of a saved prefect-email EmailServerCredentials document.")

    @field_validator("channels")
    @classmethod
    def _unique_channels(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(value))

    @model_validator(mode="after")
    def _alert_above_drift(self) -> "MonitoringPolicy":
        if self.drift_alert_threshold < self.drift_threshold:
            raise ValueError(f"drift_alert_threshold ({self.drift_alert_threshold}) must not be "
                             f"below drift_threshold ({self.drift_threshold})")
        return self

    def check_channels(self) -> None:
        """Raise ConfigurationError naming what a chosen channel lacks (before any side effect)."""
        if not self.alerting:
            return
        problems = []
        if "slack" in self.channels and not (self.slack_webhook_url or self.slack_webhook_block):
            problems.append("channel 'slack' needs slack_webhook_url or slack_webhook_block")
        if "email" in self.channels:
            if not self.email_to:
                problems.append("channel 'email' needs email_to (one or more addresses)")
            if not (self.smtp_server or self.email_credentials_block):
                problems.append("channel 'email' needs smtp_server or email_credentials_block")
        if problems:
            raise ConfigurationError("monitoring policy: " + "; ".join(problems))

    def public_summary(self) -> dict:
        """The settings as plain values, secrets left out (for reports and artifacts)."""
        return {"drift_threshold": self.drift_threshold,
                "drift_alert_threshold": self.drift_alert_threshold,
                "feature_alpha": self.feature_alpha,
                "min_effect_numeric": self.min_effect_numeric,
                "min_effect_categorical": self.min_effect_categorical,
                "accuracy_alert_threshold": self.accuracy_alert_threshold,
                "r2_alert_threshold": self.r2_alert_threshold,
                "max_relative_degradation": self.max_relative_degradation,
                "alerting": self.alerting, "channels": list(self.channels)}


def resolve_monitoring_policy(name: str | None = None) -> MonitoringPolicy:
    """The saved document `name` (an error when absent), else the saved `default`, else the
    embedded defaults."""
    if name:
        policy = load_saved(MonitoringPolicy, name)
        if policy is None:
            raise ConfigurationError(
                f"no saved MonitoringPolicy document named {name!r}; save one with "
                f"MonitoringPolicy(...).save({name!r}) or leave the policy empty for the "
                "'default' document / built-in defaults")
        return policy
    return load_saved(MonitoringPolicy, DEFAULT_DOCUMENT) or MonitoringPolicy()
