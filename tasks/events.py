"""Prefect events of mlops-flows: `mlops.<noun>.<verb-past>` on resource `mlops.model.<name>`."""
from __future__ import annotations

from typing import Any

from prefect.events import emit_event


def emit_model_event(model_name: str, event: str, payload: dict[str, Any]) -> None:
    """Emit e.g. `mlops.model.promoted`; deployment triggers in prefect.yaml react to these."""
    emit_event(event=event, resource={"prefect.resource.id": f"mlops.model.{model_name}",
                                      "prefect.resource.name": model_name},
               payload={"model_name": model_name, **payload})
