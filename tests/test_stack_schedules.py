"""`make up` again keeps the schedules a user set outside prefect.yaml (deployments/stack.py
schedules-snapshot / schedules-keep around `prefect deploy --all`), on the session's Prefect API.

`deploy` below makes the call `prefect deploy` makes for each deployment of prefect.yaml: an
upsert of the deployment with the file's schedules. tests/e2e/test_stack.py checks the same
through up.sh on a real stack; here the cases that need prefect.yaml itself to change.
"""
from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import DeploymentScheduleCreate
from prefect.client.schemas.schedules import CronSchedule

from deployments.stack import schedules_keep, schedules_snapshot


def nightly(cron: str = "0 2 * * *", active: bool = False) -> DeploymentScheduleCreate:
    return DeploymentScheduleCreate(schedule=CronSchedule(cron=cron, timezone="UTC"),
                                    active=active, slug="nightly", parameters={"model_name": "m"})


@pytest.fixture
def name() -> str:
    return f"sched-{uuid.uuid4().hex[:8]}"


def deploy(name: str, *schedules: DeploymentScheduleCreate) -> str:
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name("schedules-keep-test")
        return str(client.create_deployment(flow_id, name, schedules=list(schedules)))


def make_up(folder: Path, name: str, *schedules: DeploymentScheduleCreate) -> str:
    """What up.sh does: note the schedules, apply prefect.yaml, keep what it should. Returns the
    deployment's id."""
    before, applied = folder / "schedules.before.json", folder / "schedules.applied.json"
    schedules_snapshot(str(before))
    deployment_id = deploy(name, *schedules)
    schedules_keep(str(before), str(applied))
    return deployment_id


def schedules(deployment_id: str) -> dict[str | None, tuple[str, bool, dict]]:
    with get_client(sync_client=True) as client:
        return {s.slug: (s.schedule.cron, s.active, s.parameters)
                for s in client.read_deployment(deployment_id).schedules}


def test_a_ui_toggle_survives_a_re_up_until_prefect_yaml_changes_that_schedule(
        tmp_path, name, capsys):
    deployment_id = make_up(tmp_path, name, nightly())
    assert "as prefect.yaml gives them" in capsys.readouterr().out
    with get_client(sync_client=True) as client:  # the UI's toggle sends the whole schedule
        schedule = client.read_deployment(deployment_id).schedules[0]
        client.update_deployment_schedule(deployment_id, schedule.id, active=True,
                                          schedule=schedule.schedule,
                                          parameters=schedule.parameters)

    make_up(tmp_path, name, nightly())  # prefect.yaml unchanged: the toggle stays
    assert schedules(deployment_id) == {"nightly": ("0 2 * * *", True, {"model_name": "m"})}
    assert f"1 edited in the UI (schedules-keep-test/{name} nightly)" in capsys.readouterr().out

    make_up(tmp_path, name, nightly(cron="0 3 * * *"))  # the file changed it: the file wins
    assert schedules(deployment_id) == {"nightly": ("0 3 * * *", False, {"model_name": "m"})}


def test_schedules_added_elsewhere_come_back_when_prefect_deploy_replaces_them(tmp_path, name,
                                                                               capsys):
    deployment_id = make_up(tmp_path, name, nightly())
    with get_client(sync_client=True) as client:  # one with a slug (the REST API), one without (UI)
        client.create_deployment_schedules(deployment_id, [DeploymentScheduleCreate(
            schedule=CronSchedule(cron="0 4 * * *"), active=False, slug="retraining-check-x",
            parameters={"model_name": "x"})])
        client.create_deployment_schedules(deployment_id, [DeploymentScheduleCreate(
            schedule=CronSchedule(cron="30 5 * * 1"), active=True)])
    capsys.readouterr()

    make_up(tmp_path, name, nightly())
    assert schedules(deployment_id) == {"nightly": ("0 2 * * *", False, {"model_name": "m"}),
                                        "retraining-check-x": ("0 4 * * *", False, {"model_name": "x"}),
                                        None: ("30 5 * * 1", True, {})}
    assert "2 added outside prefect.yaml" in capsys.readouterr().out
    make_up(tmp_path, name, nightly())  # again: nothing duplicated
    assert len(schedules(deployment_id)) == 3
