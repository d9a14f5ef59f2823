"""Alerts reach REAL servers on loopback: a Slack-compatible webhook (http.server in a thread) and
an SMTP server with login (aiosmtpd in a thread); they stay silent below the thresholds, a failing
channel is reported without stopping the others, and the secrets (webhook URL, SMTP password)
appear nowhere: not in logs, events, artifacts, results nor MLflow."""
from __future__ import annotations

import email
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from email import policy as email_policy
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import mlflow
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (FlowRunFilter, FlowRunFilterId, LogFilter,
                                            LogFilterFlowRunId)
from prefect.events.filters import EventAnyResourceFilter, EventFilter
from prefect.logging.handlers import APILogHandler
from prefect_email import EmailServerCredentials
from prefect_slack import SlackWebhook

from blocks.monitoring import MonitoringPolicy
from flows.drift import check_drift, drifted_batch, evaluate_production
from flows.training import train_model
from tasks.alerts import (Alert, AlertDeliveryError, dispatch, drift_alert, performance_alert,
                          redact, send_slack)
from tasks.demo_data import churn_frame

from tests.budgets import ONE_LINEAR_TRIAL
from tests.servers import free_port

pytestmark = pytest.mark.filterwarnings(
    "ignore:Requiring AUTH while not requiring TLS:UserWarning")  # loopback SMTP without TLS

MODEL = "churn_alerts"
TOKEN = f"xoxb-secret-{uuid.uuid4().hex}"  # the secret part of the webhook URL
PASSWORD = f"smtp-pw-{uuid.uuid4().hex}"
SMTP_USER = "alerts@mlops.test"
RECIPIENTS = ["oncall@mlops.test", "ds@mlops.test"]


# --------------------------------------------------------------------------- loopback servers
@dataclass
class SlackServer:
    url: str  # base, e.g. http://127.0.0.1:PORT
    posts: list[dict] = field(default_factory=list)

    def webhook(self, status: int = 200) -> str:
        return f"{self.url}/services/{status}/{TOKEN}"


@pytest.fixture(scope="module")
def slack():
    """A Slack-compatible incoming webhook: records JSON posts; answers with the status in the
    path (/services/<status>/<token>)."""
    received: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's naming
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            status = int(self.path.split("/")[2])
            received.append({"path": self.path, "json": json.loads(body or b"{}"),
                             "content_type": self.headers.get("Content-Type")})
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            self.wfile.write(b"ok" if status == 200 else b"internal_error")

        def log_message(self, *args):  # keep the test output quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield SlackServer(url=f"http://127.0.0.1:{server.server_address[1]}", posts=received)
    finally:
        server.shutdown()
        server.server_close()


@dataclass
class SmtpServer:
    port: int
    messages: list[dict] = field(default_factory=list)
    logins: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def smtp():
    """aiosmtpd on loopback requiring a login with PASSWORD; records every message."""
    state = SmtpServer(port=free_port())

    class Handler:
        async def handle_DATA(self, server, session, envelope):  # noqa: N802 - aiosmtpd's naming
            message = email.message_from_bytes(envelope.original_content or envelope.content,
                                               policy=email_policy.default)
            plain = message.get_body(preferencelist=("plain",))
            state.messages.append({"from": envelope.mail_from, "to": list(envelope.rcpt_tos),
                                   "subject": str(message["Subject"]),
                                   "text": plain.get_content() if plain else ""})
            return "250 OK"

    def authenticator(server, session, envelope, mechanism, auth_data):
        ok = (isinstance(auth_data, LoginPassword) and auth_data.login == SMTP_USER.encode()
              and auth_data.password == PASSWORD.encode())
        if ok:
            state.logins.append(SMTP_USER)
        return AuthResult(success=ok)

    controller = Controller(Handler(), hostname="127.0.0.1", port=state.port,
                            authenticator=authenticator, auth_require_tls=False, auth_required=True)
    controller.start()
    try:
        yield state
    finally:
        controller.stop()


@pytest.fixture(autouse=True)
def _empty_inboxes(slack, smtp):
    slack.posts.clear()
    smtp.messages.clear()
    yield


@pytest.fixture(scope="module")
def churn(tmp_path_factory):
    """A module state folder with one tiny champion, and an undrifted and a drifted batch."""
    home = tmp_path_factory.mktemp("alerts")
    patch = pytest.MonkeyPatch()
    patch.setenv("MLOPS_HOME", str(home / "state"))
    try:
        rows = churn_frame().sample(800, random_state=2).reset_index(drop=True)
        train_model(rows.iloc[:450], "churn", MODEL, **ONE_LINEAR_TRIAL)
        calm = rows.iloc[450:].reset_index(drop=True)
        drifted = home / "drifted.csv"
        drifted_batch(calm).to_csv(drifted, index=False)
        yield {"calm": calm, "drifted": str(drifted)}
    finally:
        patch.undo()


def save_policy(name: str, slack: SlackServer, smtp: SmtpServer, **overrides) -> str:
    settings = dict(channels=["log", "slack", "email"], slack_webhook_url=slack.webhook(200),
                    email_to=RECIPIENTS, email_from=SMTP_USER, smtp_server="127.0.0.1",
                    smtp_port=smtp.port, smtp_type="INSECURE", smtp_username=SMTP_USER,
                    smtp_password=PASSWORD)
    settings.update(overrides)
    MonitoringPolicy(**settings).save(name, overwrite=True)
    return name


@pytest.fixture
def policy(slack, smtp):
    name = f"alerts-test-{uuid.uuid4().hex[:8]}"
    yield lambda **overrides: save_policy(name, slack, smtp, **overrides)
    try:
        MonitoringPolicy.delete(name)
    except Exception:
        pass


def everything_the_run_left(flow_run_id) -> str:
    """Logs, events and artifacts of a flow run (as the Prefect API returns them), as text."""
    APILogHandler().flush()  # drains the log worker (sends queued logs to the API)
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        texts = [log.message for log in logs]
        deadline = time.monotonic() + 10
        events: list = []
        event_filter = EventFilter(any_resource=EventAnyResourceFilter(
            id=[f"prefect.flow-run.{flow_run_id}"]))
        while time.monotonic() < deadline:
            page = client.read_events(filter=event_filter, limit=50)
            events = list(page.events)
            while page.next_page is not None:
                page = client.read_events_page(page.next_page)
                events += page.events
            if any(e.event == "prefect.flow-run.Completed" for e in events):
                break
            time.sleep(0.25)
        texts += [e.model_dump_json() for e in events]
        artifacts = client.read_artifacts(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        assert artifacts, "the check published no artifact"
        texts += [a.data if isinstance(a.data, str) else json.dumps(a.data) for a in artifacts]
    return "\n".join(texts)


def assert_no_secret(*texts: str) -> None:
    for text in texts:
        assert TOKEN not in text and PASSWORD not in text


# --------------------------------------------------------------------------- end to end
def test_a_drift_alert_reaches_slack_and_email_and_no_secret_leaks(churn, slack, smtp, policy,
                                                                   capfd):
    state = check_drift(MODEL, churn["drifted"], policy=policy(), return_state=True)
    report = state.result()
    assert report.drifted and report.score > 0.5 and report.alerted
    assert report.alerts_sent == ["log", "slack", "email"] and report.alert_errors == []

    assert len(slack.posts) == 1
    post = slack.posts[0]
    assert post["path"].endswith(TOKEN) and post["content_type"].startswith("application/json")
    text = post["json"]["text"]
    assert f"{MODEL} v{report.version}" in text
    assert f"model drift score {report.score:.3f} is above drift_alert_threshold 0.50" in text
    assert "contract" in text and churn["drifted"] in text
    assert post["json"]["blocks"][0]["type"] == "header"

    assert smtp.logins == [SMTP_USER] * len(smtp.logins) and smtp.logins
    assert len(smtp.messages) == 1
    mail = smtp.messages[0]
    assert mail["from"] == SMTP_USER and sorted(mail["to"]) == sorted(RECIPIENTS)
    assert mail["subject"] == (f"[mlops] drift alert: {MODEL} v{report.version} drift score "
                               f"{report.score:.2f} > 0.50")
    assert "drift_alert_threshold 0.50" in mail["text"]

    left = everything_the_run_left(state.state_details.flow_run_id)
    assert "[mlops] drift alert" in left  # the log channel's line reached the API
    run_report = Path(mlflow.artifacts.download_artifacts(
        run_id=report.run_id, artifact_path="drift/report.json")).read_text()
    captured = capfd.readouterr()
    assert_no_secret(left, report.model_dump_json(), run_report, captured.out, captured.err)


def test_alerts_stay_silent_below_the_thresholds(churn, slack, smtp, policy):
    name = policy(accuracy_alert_threshold=0.5, max_relative_degradation=0.5)
    calm = check_drift(MODEL, churn["calm"], policy=name)
    assert not calm.drifted and not calm.alerted and calm.alerts_sent == []
    healthy = evaluate_production(MODEL, churn["calm"], "churn", policy=name)
    assert not healthy.degraded and not healthy.alerted
    # drifted (score above drift_threshold 0.3) but below a raised alert threshold: no alert
    quiet = check_drift(MODEL, churn["drifted"], policy=policy(drift_alert_threshold=0.99))
    assert quiet.drifted and not quiet.alerted
    muted = check_drift(MODEL, churn["drifted"], policy=policy(alerting=False))
    assert muted.drifted and not muted.alerted
    assert slack.posts == [] and smtp.messages == []


def test_a_performance_alert_says_what_crossed_which_threshold(churn, slack, smtp, policy):
    flipped = churn["calm"].assign(churn=churn["calm"]["churn"].map({"Yes": "No", "No": "Yes"}))
    report = evaluate_production(MODEL, flipped, "churn", policy=policy())
    assert report.degraded and report.alerts_sent == ["log", "slack", "email"]
    text = slack.posts[0]["json"]["text"]
    assert f"{MODEL} v{report.version} degraded" in text
    assert f"accuracy {report.metrics['accuracy']:.4f} is below accuracy_alert_threshold 0.80" in text
    assert smtp.messages[0]["subject"] == f"[mlops] performance alert: {MODEL} v{report.version} degraded"


def test_a_failing_channel_is_reported_and_the_others_still_go(churn, slack, smtp, policy):
    report = check_drift(MODEL, churn["drifted"],
                         policy=policy(slack_webhook_url=slack.webhook(500)))
    assert report.alerted and report.alerts_sent == ["log", "email"]
    assert len(report.alert_errors) == 1
    assert report.alert_errors[0].startswith("slack: Slack webhook answered HTTP 500")
    assert len(slack.posts) == 3  # first try + 2 retries
    assert len(smtp.messages) == 1
    assert_no_secret(report.model_dump_json())


# --------------------------------------------------------------------------- channels directly
def _alert() -> Alert:
    return Alert(kind="drift", model_name="m", version=3, subject="[mlops] drift alert: m v3",
                 reasons=["model drift score 0.700 is above drift_alert_threshold 0.50"])


def test_saved_slack_and_email_blocks_can_be_referenced_by_name(slack, smtp):
    SlackWebhook(url=slack.webhook(200)).save("alerts-test-slack", overwrite=True)
    EmailServerCredentials(username=SMTP_USER, password=PASSWORD, smtp_server="127.0.0.1",
                           smtp_port=smtp.port, smtp_type="INSECURE").save("alerts-test-smtp",
                                                                           overwrite=True)
    try:
        settings = MonitoringPolicy(channels=["slack", "email"], slack_webhook_block="alerts-test-slack",
                                    email_credentials_block="alerts-test-smtp", email_to=RECIPIENTS)
        settings.check_channels()

        @flow
        def alert_flow():
            return dispatch(_alert(), settings)

        assert alert_flow() == (["slack", "email"], [])
    finally:
        SlackWebhook.delete("alerts-test-slack")
        EmailServerCredentials.delete("alerts-test-smtp")
    assert slack.posts[0]["json"]["text"].startswith("[mlops] drift alert: m v3")
    assert smtp.messages[0]["subject"] == "[mlops] drift alert: m v3"


def test_an_unreachable_webhook_fails_without_naming_it():
    dead = f"http://127.0.0.1:{free_port()}/services/200/{TOKEN}"
    with pytest.raises(AlertDeliveryError, match="Slack webhook unreachable") as caught:
        send_slack(_alert(), MonitoringPolicy(channels=["slack"], slack_webhook_url=dead))
    assert TOKEN not in str(caught.value) and dead not in str(caught.value)


def test_the_policy_keeps_its_secrets_masked():
    settings = MonitoringPolicy(slack_webhook_url=f"https://hooks.example/{TOKEN}",
                                smtp_password=PASSWORD)
    assert_no_secret(repr(settings), str(settings), settings.model_dump_json(),
                     json.dumps(settings.public_summary()))
    assert redact(f"failed at https://hooks.example/{TOKEN}", [TOKEN]) == "failed at https://hooks.example/***"


def test_alert_decisions_are_threshold_exact():
    settings = MonitoringPolicy()
    assert drift_alert("m", 1, 0.5, ["a"], settings) is None  # "exceeds 0.5": strictly above
    alert = drift_alert("m", 1, 0.51, ["a", "b"], settings, data_ref="s3://b/k.csv")
    assert alert.subject == "[mlops] drift alert: m v1 drift score 0.51 > 0.50"
    assert "drifted features (2): a, b" in alert.text() and "s3://b/k.csv" in alert.text()
    assert performance_alert("m", 1, [], settings) is None
    assert drift_alert("m", 1, 0.9, ["a"], MonitoringPolicy(alerting=False)) is None
    html = performance_alert("m", 2, ["accuracy 0.7 is below accuracy_alert_threshold 0.80 <x>"],
                             settings).html()
    assert "&lt;x&gt;" in html

