"""Schedules of deployments through Prefect's client: one schedule per (deployment, slug), added
or updated in place, so asking twice for the same model never duplicates it."""
from __future__ import annotations

from pydantic import BaseModel, ValidationError

from tasks.errors import ConfigurationError, MlopsError


class DeploymentNotFoundError(MlopsError, LookupError):
    """The deployment is not on the Prefect API in use (prefect.yaml not deployed there)."""


class ScheduleInfo(BaseModel):
    schedule_id: str
    deployment: str
    cron: str
    timezone: str
    active: bool
    slug: str
    parameters: dict = {}
    created: bool = False


def cron_schedule(cron: str, timezone: str):
    from prefect.client.schemas.schedules import CronSchedule

    try:
        return CronSchedule(cron=cron, timezone=timezone)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = str(err["loc"][0]) if err.get("loc") else "cron"
        value = cron if field == "cron" else timezone
        raise ConfigurationError(f"{field} {value!r} is not valid: {err['msg']} (e.g. cron "
                                 "'0 2 * * *' and timezone 'UTC' or 'Europe/Berlin')") from None


def upsert_schedule(deployment: str, slug: str, cron: str, timezone: str, active: bool,
                    parameters: dict) -> ScheduleInfo:
    """Add the schedule `slug` to `deployment`, or update it when it exists."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL

    schedule = cron_schedule(cron, timezone)
    with get_client(sync_client=True) as client:
        try:
            found = client.read_deployment_by_name(deployment)
        except ObjectNotFound:
            raise DeploymentNotFoundError(
                f"no deployment {deployment!r} on the Prefect API "
                f"({PREFECT_API_URL.value() or 'embedded'}); deploy prefect.yaml there first "
                "(make up, or prefect deploy --all)") from None
        existing = next((s for s in client.read_deployment_schedules(found.id) if s.slug == slug),
                        None)
        if existing is None:
            created = client.create_deployment_schedules(
                found.id, [(schedule, active)], parameters=parameters, slug=slug)[0]
            schedule_id, is_new = created.id, True
        else:
            client.update_deployment_schedule(found.id, existing.id, active=active,
                                              schedule=schedule, parameters=parameters)
            schedule_id, is_new = existing.id, False
    return ScheduleInfo(schedule_id=str(schedule_id), deployment=deployment, cron=cron,
                        timezone=timezone, active=active, slug=slug, parameters=parameters,
                        created=is_new)
