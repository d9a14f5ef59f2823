"""The Kubernetes work-pool variant (deployments/kubernetes/): its base job template is accepted by
`prefect work-pool create --type kubernetes` on a real Prefect server (the session's), renders into
a Job manifest through prefect-kubernetes' own job configuration, and a template that names an
undefined variable is refused. No cluster here: the jobs themselves cannot run in the tests."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid

import pytest

from tests.conftest import ROOT

TEMPLATE = ROOT / "deployments" / "kubernetes" / "base-job-template.json"


def prefect_cli(*args: str) -> subprocess.CompletedProcess[str]:
    from prefect.settings import PREFECT_API_URL

    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_API_URL=PREFECT_API_URL.value(), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    return subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", *args], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_the_kubernetes_template_is_accepted_by_prefect_and_renders_a_job(tmp_path):
    pytest.importorskip("prefect_kubernetes", reason="pip install prefect-kubernetes "
                                                     "(requirements-dev.txt)")
    from prefect.client.orchestration import get_client
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    template = json.loads(TEMPLATE.read_text())
    name = f"faults-k8s-{uuid.uuid4().hex[:6]}"
    created = prefect_cli("work-pool", "create", name, "--type", "kubernetes",
                          "--base-job-template", str(TEMPLATE))
    assert created.returncode == 0, created.stdout + created.stderr
    with get_client(sync_client=True) as client:
        pool = client.read_work_pool(name)
    assert pool.type == "kubernetes" and pool.base_job_template == template

    defaults = {k: v["default"] for k, v in template["variables"]["properties"].items()
                if v.get("default") is not None}
    config = asyncio.run(KubernetesWorkerJobConfiguration.from_template_and_values(
        template, defaults))
    container = config.job_manifest["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "mlops-flows:latest"
    # Kubernetes never starts a second pod for the same flow run (it could register twice)
    assert config.job_manifest["spec"]["backoffLimit"] == 0
    assert config.env["MLOPS_HOME"] == "/tmp/mlops"  # run state in the pod, never a node disk

    broken = json.loads(TEMPLATE.read_text())
    broken["job_configuration"]["job_manifest"]["metadata"]["labels"] = "{{ no_such_variable }}"
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    refused = prefect_cli("work-pool", "create", f"{name}-broken", "--type", "kubernetes",
                          "--base-job-template", str(tmp_path / "broken.json"))
    assert refused.returncode != 0 and "no_such_variable" in refused.stdout + refused.stderr
