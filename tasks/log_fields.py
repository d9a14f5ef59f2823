"""Context fields of JSON log lines, shared by the REST service and the flows.

`LogContextFilter` gives every record the fields `model_name`, `version`, `request_id` and
`flow_run_id` (None where unknown) and masks API keys and bearer tokens in messages. The service
sets `request_id` and the model it works on through the context variables below; inside a flow
run the flow run id and its `model_name`/`version` parameters are read from Prefect's run
context. The logging configuration (deployments/logging-json.yml) names this filter, so flows run
by a worker log the same fields. No Prefect import at module level.
"""
from __future__ import annotations

import contextvars
import logging
import re

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("mlops_request_id",
                                                                            default=None)
model_name_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("mlops_model_name",
                                                                            default=None)
version_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("mlops_version",
                                                                         default=None)
FIELDS = ("model_name", "version", "request_id", "flow_run_id")
SECRET_PATTERNS = (re.compile(r"mlops_[A-Za-z0-9_\-]{20,}"),
                   re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=\-]+"),
                   re.compile(r"(?i)((?:password|secret|token|api[_-]?key)[\"']?\s*[:=]\s*[\"']?)"
                              r"[^\s\"',}]+"))


def redact(text: str) -> str:
    text = SECRET_PATTERNS[0].sub("mlops_***", text)
    text = SECRET_PATTERNS[1].sub(r"\1***", text)
    return SECRET_PATTERNS[2].sub(r"\1***", text)


def _run_context() -> tuple[str | None, dict]:
    try:
        from prefect.context import FlowRunContext
    except ImportError:  # pragma: no cover - prefect is a requirement
        return None, {}
    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        return None, {}
    return str(ctx.flow_run.id), dict(ctx.flow_run.parameters or {})


class LogContextFilter(logging.Filter):
    """Adds the context fields to each record and masks secrets in its message."""

    def filter(self, record: logging.LogRecord) -> bool:
        run_id, params = _run_context()
        if getattr(record, "flow_run_id", None) is None:
            record.flow_run_id = run_id
        if getattr(record, "request_id", None) is None:
            record.request_id = request_id_var.get()
        if getattr(record, "model_name", None) is None:
            name = model_name_var.get() or params.get("model_name")
            record.model_name = name if isinstance(name, str) else None
        if getattr(record, "version", None) is None:
            version = version_var.get() or params.get("version")
            record.version = None if version is None else str(version)
        if record.flow_run_id is not None:
            record.flow_run_id = str(record.flow_run_id)
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True
