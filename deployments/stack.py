"""Helpers for deployments/up.sh and down.sh (run with the project's Python, never imported by flows).

    python deployments/stack.py spawn LOG PIDFILE -- CMD...   start CMD in its own session, print pid
    python deployments/stack.py pid-state PIDFILE    ours | gone | other: is the recorded process
                                                     still the one spawn started?
    python deployments/stack.py wait-http URL TIMEOUT PIDFILE LOG   wait until URL answers 2xx
    python deployments/stack.py wait-worker API POOL NAME TIMEOUT PIDFILE LOG
    python deployments/stack.py ensure-db URL                  CREATE DATABASE if absent (PostgreSQL)
    python deployments/stack.py drop-db URL                    DROP DATABASE if present (PostgreSQL)
    python deployments/stack.py save-mlflow-config TRACKING_URI
    python deployments/stack.py profile-activate NAME API_URL STATEFILE
    python deployments/stack.py profile-restore STATEFILE
    python deployments/stack.py ensure-bucket ENDPOINT BUCKET  create the bucket if absent
    python deployments/stack.py save-production-blocks ENDPOINT BUCKET
                                 the bucket (ensure-bucket), then the blocks naming the
                                 production profile's shared stores
                                 (S3 keys from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, the
                                 A/B store from MLOPS_AB_DATABASE_URL)
    python deployments/stack.py crash-automation HEARTBEAT_SECONDS
                                 the automation that marks runs without heartbeats Crashed
    python deployments/stack.py schedules-snapshot OUT
                                 every deployment's schedules, before `prefect deploy` replaces them
    python deployments/stack.py schedules-keep BEFORE APPLIED
                                 after `prefect deploy`: put back what it replaced but prefect.yaml
                                 did not change (schedules added outside it, UI edits); APPLIED
                                 remembers what prefect.yaml gave, for the next re-up
    python deployments/stack.py git-prefect-file REPOSITORY COMMIT OUT [WORK_POOL]
                                 prefect.yaml whose runs clone REPOSITORY at COMMIT (workers
                                 on other machines); WORK_POOL replaces the pool of every deployment

Each command prints one line a shell can use and exits non-zero with a message on failure.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


# Loopback services: never through an HTTP(S)_PROXY from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(1)


def _leader_alive(pidfile: str) -> bool:
    """Whether the process recorded in PIDFILE (first field) still exists."""
    try:
        pid = int(Path(pidfile).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie leader (exited, not yet reaped) counts as dead.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except OSError:
        return True


def spawn(log: str, pidfile: str, cmd: list[str]) -> None:
    """Start CMD detached in a new session (pid == process group id), output appended to LOG."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )
    Path(pidfile).write_text(f"{proc.pid} {start_mark(proc.pid)}\n")
    print(proc.pid)


def start_mark(pid: int) -> str:
    """What tells process PID from a later process given the same pid: on Linux its start in clock
    ticks since boot (/proc/PID/stat), which stays put when the wall clock is stepped (NTP after a
    laptop wakes, a restored VM); `ps -o lstart=` moves with it, and a 3 s step made `make down`
    take every service for another program. Elsewhere (macOS) `ps -o lstart=`. '' when no such
    process."""
    if Path("/proc/self/stat").exists():
        try:
            # after the command name in parentheses (which may hold spaces): state is field 3,
            # starttime field 22
            return "boot+" + Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
        except (OSError, IndexError):
            return ""
    return _lstart(pid)


def _lstart(pid: int) -> str:
    return " ".join(subprocess.run(["ps", "-o", "lstart=", "-p", str(pid)], capture_output=True,
                                   text=True).stdout.split())


def pid_state(pidfile: str) -> str:
    """'ours' when the process recorded in PIDFILE is alive and the one spawn started, 'other'
    when its pid now names another process, 'gone' when no process has it (or nothing is
    recorded). Records of earlier versions hold `ps -o lstart=` and are compared that way."""
    try:
        pid, _, recorded = Path(pidfile).read_text().strip().partition(" ")
        pid_number = int(pid)
    except (OSError, ValueError):
        return "gone"
    now = start_mark(pid_number) if recorded.startswith("boot+") else _lstart(pid_number)
    if not now:
        return "gone"
    return "ours" if now == " ".join(recorded.split()) else "other"


def _tail(path: str, lines: int = 25) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_http(url: str, timeout: float, pidfile: str, log: str | None = None) -> None:
    """Wait until URL answers 2xx; fail early when the process in PIDFILE died."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            with _OPENER.open(url, timeout=2) as resp:
                if 200 <= resp.status < 300:
                    return
                last = f"HTTP {resp.status}"
        except (urllib.error.URLError, OSError) as exc:
            last = str(exc)
        if not _leader_alive(pidfile):
            _fail(f"the process serving {url} exited; last log lines:\n{_tail(log or '')}")
        time.sleep(0.25)
    _fail(f"{url} did not answer within {timeout:.0f}s ({last}); last log lines:\n{_tail(log or '')}")


def wait_worker(api: str, pool: str, name: str, timeout: float, pidfile: str, log: str) -> None:
    """Wait until the worker NAME has sent a heartbeat to POOL since its process started.

    (A worker of the same name from an earlier session may still be listed as ONLINE.)
    """
    from datetime import datetime

    started = Path(pidfile).stat().st_mtime - 1
    deadline = time.monotonic() + timeout
    url = f"{api}/work_pools/{pool}/workers/filter"
    while time.monotonic() < deadline:
        req = urllib.request.Request(
            url, data=b"{}", headers={"Content-Type": "application/json"}, method="POST"
        )
        try:
            with _OPENER.open(req, timeout=5) as resp:
                workers = json.load(resp)
            for w in workers:
                beat = w.get("last_heartbeat_time")
                if w.get("name") == name and beat and datetime.fromisoformat(beat).timestamp() >= started:
                    return
        except (urllib.error.URLError, OSError, ValueError):
            pass
        if not _leader_alive(pidfile):
            _fail(f"worker {name!r} exited; last log lines:\n{_tail(log)}")
        time.sleep(0.25)
    _fail(f"worker {name!r} did not come online within {timeout:.0f}s; log:\n{_tail(log)}")


def _pg_admin(url: str):
    """(psycopg2 connection to the maintenance database, database name) for a SQLAlchemy URL."""
    from sqlalchemy.engine import make_url

    u = make_url(url)
    if not u.drivername.startswith("postgresql"):
        return None, None
    import psycopg2

    host, port = u.host or "127.0.0.1", u.port or 5432
    try:
        conn = psycopg2.connect(
            dbname="postgres",
            user=u.username,
            password=u.password,
            host=host,
            port=port,
            **{k: v for k, v in u.query.items() if isinstance(v, str)},
        )
    except psycopg2.OperationalError as exc:
        _fail(
            f"cannot connect to PostgreSQL at {host}:{port} as {u.username!r} to create or drop "
            f"database {u.database!r}: {str(exc).strip()} (is the server running, and may this "
            "user create databases?)"
        )
    conn.autocommit = True
    return conn, u.database


def ensure_db(url: str) -> None:
    conn, name = _pg_admin(url)
    if conn is None:
        print("not postgresql: nothing to create")
        return
    from psycopg2 import sql

    try:  # autocommit, no `with conn` (that opens a transaction; CREATE DATABASE refuses one)
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if cur.fetchone():
                print(f"PostgreSQL database {name} exists")
                return
            cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            print(f"PostgreSQL database {name} created")
    finally:
        conn.close()


def drop_db(url: str) -> None:
    conn, name = _pg_admin(url)
    if conn is None:
        return
    from psycopg2 import sql

    try:
        with conn.cursor() as cur:
            cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
    finally:
        conn.close()
    print(f"PostgreSQL database {name} dropped")


def save_mlflow_config(tracking_uri: str) -> None:
    """Save the `default` MLflowConfig document every flow resolves (blocks/mlflow_config.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from blocks.mlflow_config import DEFAULT_DOCUMENT, MLflowConfig

    MLflowConfig(tracking_uri=tracking_uri).save(DEFAULT_DOCUMENT, overwrite=True)
    print(f"MLflowConfig/{DEFAULT_DOCUMENT} -> {tracking_uri}")


CRASH_AUTOMATION = "mlops: mark flow runs without heartbeats Crashed"


def _comparable(automation) -> dict:
    """An automation as JSON, its trigger's event sets sorted (their order varies by process)."""
    dumped = automation.model_dump(mode="json")
    for key in ("after", "expect", "for_each"):
        dumped["trigger"][key] = sorted(dumped["trigger"][key])
    return dumped


def crash_automation(heartbeat_seconds: str) -> None:
    """Create or update the automation that marks a flow run Crashed when its heartbeats stop.

    A worker killed with its flow-run process (kill -9, a lost machine) cannot report anything:
    without this the run stays Running forever. Runs started by a worker send a heartbeat every
    HEARTBEAT_SECONDS (PREFECT_FLOWS_HEARTBEAT_FREQUENCY, set on the worker by up.sh); no
    heartbeat and no final state within three of them -> Crashed. This is the automation of
    Prefect's guide "How to detect and respond to zombie flows".
    """
    from datetime import timedelta

    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification
    from prefect.exceptions import ObjectNotFound

    within = 3 * max(int(heartbeat_seconds), 30)
    wanted = Automation(
        name=CRASH_AUTOMATION,
        description=f"No heartbeat and no final state for {within} s: the process running the "
                    "flow run is gone (deployments/up.sh).",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed",
                    "prefect.flow-run.Failed", "prefect.flow-run.Cancelled",
                    "prefect.flow-run.Crashed"},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1,
            within=timedelta(seconds=within)),
        actions=[ChangeFlowRunState(
            state=StateType.CRASHED,
            message=f"no heartbeat for {within} s: the worker or its flow-run process died")])
    try:
        existing = Automation.read(name=CRASH_AUTOMATION)
    except (ObjectNotFound, ValueError):
        existing = None
    if existing is None:
        wanted.create()
        print(f"automation {CRASH_AUTOMATION!r} created (no heartbeat for {within} s -> Crashed)")
    else:
        # Updated only when it changed: the server keeps each silent run's window under the
        # trigger, and an update replaces the trigger (a new id), forgetting those windows. A run
        # whose worker died just before this `make up` would then stay Running forever.
        wanted.id = existing.id
        if _comparable(wanted) == _comparable(existing):
            print(f"automation {CRASH_AUTOMATION!r} unchanged (no heartbeat for {within} s -> "
                  "Crashed)")
            return
        wanted.update()
        print(f"automation {CRASH_AUTOMATION!r} updated (no heartbeat for {within} s -> Crashed)")


def _read_schedules() -> dict[str, dict]:
    """{deployment id: {"name": flow/deployment, "schedules": [schedule as JSON]}} of the API."""
    from prefect.client.orchestration import get_client

    def every(read) -> list:  # the API answers at most 200 a call
        found: list = []
        while page := read(limit=200, offset=len(found)):
            found += page
        return found

    with get_client(sync_client=True) as client:
        flows = {f.id: f.name for f in every(client.read_flows)}
        return {str(d.id): {"name": f"{flows.get(d.flow_id, '?')}/{d.name}",
                            "schedules": [{"id": str(s.id), "slug": s.slug, "active": s.active,
                                           "parameters": s.parameters,
                                           "max_scheduled_runs": s.max_scheduled_runs,
                                           "schedule": s.schedule.model_dump(mode="json")}
                                          for s in d.schedules]}
                for d in every(client.read_deployments)}


def schedules_snapshot(out: str) -> None:
    """Write every deployment's schedules to OUT, for schedules_keep: `prefect deploy` resets the
    schedules prefect.yaml names and, where a deployment has a schedule without a slug, replaces
    all of its schedules with the file's."""
    found = _read_schedules()
    Path(out).write_text(json.dumps(found, indent=1))
    print(f"{sum(len(d['schedules']) for d in found.values())} schedules of {len(found)} "
          "deployments noted")


def _definition(schedule: dict) -> dict:
    return {k: schedule[k] for k in ("schedule", "active", "parameters")}


def schedules_keep(before_file: str, applied_file: str) -> None:
    """After `prefect deploy`, keep what a user set outside prefect.yaml.

    - A schedule prefect.yaml does not name (another slug or none: added by the REST API's
      `retraining/schedule`, or in the Prefect UI) is put back as it was.
    - A schedule prefect.yaml names (by slug) keeps the state it had before this deploy (turned on
      or off in the UI, its parameters edited there) when its entry in prefect.yaml is the same
      as at the previous deploy (APPLIED); when prefect.yaml changed it, prefect.yaml wins.
    Then APPLIED records what prefect.yaml gave this time. Prints one line."""
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentScheduleCreate

    before_path, applied_path = Path(before_file), Path(applied_file)
    before = json.loads(before_path.read_text()) if before_path.exists() else {}
    applied = json.loads(applied_path.read_text()) if applied_path.exists() else {}
    now = _read_schedules()
    added_back, edits_kept = [], []
    with get_client(sync_client=True) as client:
        for deployment_id, was in before.items():
            if deployment_id not in now:
                continue
            current = {s["slug"]: s for s in now[deployment_id]["schedules"] if s["slug"]}
            unnamed = [_definition(s) for s in now[deployment_id]["schedules"] if not s["slug"]]
            previous = {s["slug"]: s for s in applied.get(deployment_id, {}).get("schedules", [])
                        if s["slug"]}
            label = now[deployment_id]["name"]
            for old in was["schedules"]:
                slug = old["slug"]
                if slug in current:
                    yaml_now, yaml_then = current[slug], previous.get(slug)
                    if (yaml_then is not None and _definition(yaml_then) == _definition(yaml_now)
                            and _definition(old) != _definition(yaml_now)):
                        client.update_deployment_schedule(
                            UUID(deployment_id), UUID(yaml_now["id"]), active=old["active"],
                            schedule=DeploymentScheduleCreate(schedule=old["schedule"]).schedule,
                            parameters=old["parameters"])
                        edits_kept.append(f"{label} {slug}")
                    continue
                if not slug and _definition(old) in unnamed:
                    continue  # an unnamed schedule prefect.yaml gave again
                client.create_deployment_schedules(UUID(deployment_id), [DeploymentScheduleCreate(
                    schedule=old["schedule"], active=old["active"], parameters=old["parameters"],
                    max_scheduled_runs=old["max_scheduled_runs"], slug=slug)])
                added_back.append(f"{label} {slug or '(unnamed)'}")
    applied_path.write_text(json.dumps(now, indent=1))
    before_path.unlink(missing_ok=True)
    if not added_back and not edits_kept:
        print("schedules: as prefect.yaml gives them (none set elsewhere to keep)")
        return
    print(f"schedules kept: {len(added_back)} added outside prefect.yaml"
          f"{' (' + ', '.join(added_back) + ')' if added_back else ''}, {len(edits_kept)} edited "
          f"in the UI{' (' + ', '.join(edits_kept) + ')' if edits_kept else ''}")


def git_prefect_file(repository: str, commit: str, out: str, work_pool: str | None = None) -> None:
    """Write OUT: prefect.yaml with a pull step that clones REPOSITORY at COMMIT.

    prefect.yaml's own pull step changes to the deploying checkout's folder, which exists only on
    that machine. With this file every flow run clones the repository at the deployed commit into
    the temporary folder the process worker gives each run, so a worker on any machine (any
    folder, any HOME) runs exactly the code that was deployed; two runs never share a clone.
    """
    import yaml

    root = Path(__file__).resolve().parent.parent
    if not repository or not commit:
        _fail("git-prefect-file needs a repository URL and a commit (git rev-parse HEAD)")
    config = yaml.safe_load((root / "prefect.yaml").read_text())
    config.pop("build", None)  # it only recorded the deploying folder for the pull step replaced
    config["pull"] = [{"prefect.deployments.steps.git_clone": {
        "repository": repository, "commit_sha": commit, "clone_directory_name": "mlops-flows"}}]
    if work_pool:
        for deployment in config["deployments"]:
            deployment["work_pool"] = {**deployment["work_pool"], "name": work_pool}
    header = (f"# Generated by deployments/stack.py git-prefect-file from prefect.yaml: every run\n"
              f"# clones {repository} at {commit}. Edit prefect.yaml, not this file.\n")
    Path(out).write_text(header + yaml.safe_dump(config, sort_keys=False, width=100))
    print(f"{out}: {len(config['deployments'])} deployments, code from {repository} at {commit[:12]}")


def save_api_settings(host: str, port: str, keys_file: str) -> None:
    """Save the `default` APISettings document the REST service and `python -m api.keys` resolve
    (blocks/api_settings.py): where it listens and where the hashed keys live."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from blocks.api_settings import APISettings
    from blocks.mlflow_config import DEFAULT_DOCUMENT

    try:
        current = APISettings.load(DEFAULT_DOCUMENT)
    except ValueError:
        current = APISettings()
    current.host, current.port, current.keys_file = host, int(port), keys_file
    current.save(DEFAULT_DOCUMENT, overwrite=True)
    print(f"APISettings/{DEFAULT_DOCUMENT} -> {host}:{port}, keys in {keys_file}")


S3_BLOCK = "mlops-s3"               # exports, scored batches (the whole bucket)
RESULTS_BLOCK = "mlops-results"     # Prefect's default result storage (a folder of the bucket)


def _s3_credentials(endpoint: str):
    """MinIOCredentials for ENDPOINT from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (never argv)."""
    from prefect_aws import AwsClientParameters, MinIOCredentials

    user, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if not user or not secret:
        _fail("the production profile needs AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY for the "
              f"S3 endpoint {endpoint}")
    return MinIOCredentials(minio_root_user=user, minio_root_password=secret,
                            region_name=os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
                            aws_client_parameters=AwsClientParameters(endpoint_url=endpoint))


def ensure_bucket(endpoint: str, bucket: str) -> None:
    """Create BUCKET on the S3-compatible ENDPOINT when absent."""
    from botocore.exceptions import BotoCoreError, ClientError

    client = _s3_credentials(endpoint).get_client("s3")
    try:
        client.head_bucket(Bucket=bucket)
        print(f"S3 bucket {bucket} exists at {endpoint}")
        return
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
            _fail(f"S3 bucket {bucket} at {endpoint}: {exc}")
    except BotoCoreError as exc:
        _fail(f"cannot reach the S3 endpoint {endpoint}: {exc}")
    client.create_bucket(Bucket=bucket)
    print(f"S3 bucket {bucket} created at {endpoint}")


def save_production_blocks(endpoint: str, bucket: str) -> None:
    """BUCKET created when absent, then the blocks that name the shared stores of the production profile: S3Bucket `mlops-s3`
    (the whole bucket) for exports (ExportSettings) and scored batches (ABPolicy.scores_location),
    the A/B store's PostgreSQL URL (ABPolicy.database_url), and S3Bucket `mlops-results` as the
    server's default result storage, which every worker reads from the Prefect API. Other fields
    of saved ABPolicy/ExportSettings documents are kept."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from prefect.client.orchestration import get_client
    from prefect_aws.s3 import S3Bucket

    from pydantic import SecretStr

    from blocks.ab_policy import ABPolicy, normalise_database_url
    from blocks.documents import load_saved
    from blocks.export_settings import ExportSettings
    from blocks.mlflow_config import DEFAULT_DOCUMENT

    ab_database_url = os.environ.get("MLOPS_AB_DATABASE_URL") or _fail(
        "save-production-blocks needs MLOPS_AB_DATABASE_URL (kept out of argv: `ps` shows argv)")
    ensure_bucket(endpoint, bucket)
    credentials = _s3_credentials(endpoint)
    S3Bucket(bucket_name=bucket, credentials=credentials).save(S3_BLOCK, overwrite=True)
    results_id = S3Bucket(bucket_name=bucket, bucket_folder="prefect-results",
                          credentials=credentials).save(RESULTS_BLOCK, overwrite=True)
    with get_client(sync_client=True) as client:
        client.update_server_default_result_storage(results_id)
    policy = load_saved(ABPolicy, DEFAULT_DOCUMENT) or ABPolicy()
    policy.database_url = SecretStr(normalise_database_url(ab_database_url))
    policy.scores_location = f"s3://{bucket}/ab/scores"
    policy.save(DEFAULT_DOCUMENT, overwrite=True)
    export = load_saved(ExportSettings, DEFAULT_DOCUMENT) or ExportSettings()
    export.s3_bucket_block = S3_BLOCK
    export.save(DEFAULT_DOCUMENT, overwrite=True)
    print(f"S3Bucket/{S3_BLOCK} -> s3://{bucket} at {endpoint}; ExportSettings and "
          f"ABPolicy.scores_location use it; ABPolicy.database_url -> PostgreSQL; Prefect results "
          f"-> S3Bucket/{RESULTS_BLOCK} (s3://{bucket}/prefect-results)")


def profile_activate(name: str, api_url: str, statefile: str) -> None:
    """Create/update Prefect profile NAME with PREFECT_API_URL and make it the active one.

    What was active before (and whether NAME existed) is recorded in STATEFILE, once: a second
    `up` keeps the original record, so `profile-restore` returns to what the user had.
    """
    from prefect.settings import PREFECT_API_URL, load_profiles, save_profiles

    from prefect.settings import get_current_settings

    profiles = load_profiles()
    state = Path(statefile)
    if not state.exists():
        record = {
            "profile": name,
            "previous": profiles.active_name,
            "created": name not in profiles.names,
            "profiles_file": str(get_current_settings().profiles_path),
            "file_existed": get_current_settings().profiles_path.exists(),
        }
        state.write_text(json.dumps(record) + "\n")
    profiles.update_profile(name, {PREFECT_API_URL: api_url})
    profiles.set_active(name)
    save_profiles(profiles)
    print(name)


def profile_restore(statefile: str) -> None:
    """Undo `profile-activate`: re-activate the previous profile, remove NAME if up created it."""
    from prefect.settings import load_profiles, save_profiles

    state = Path(statefile)
    if not state.exists():
        return
    recorded = json.loads(state.read_text())
    name, previous = recorded.get("profile"), recorded.get("previous")
    profiles = load_profiles()
    if profiles.active_name == name:  # the user did not switch meanwhile
        profiles.set_active(previous if previous in profiles.names else None, check=False)
    if recorded.get("created") and name in profiles.names and profiles.active_name != name:
        profiles.remove_profile(name)
    save_profiles(profiles)
    path = Path(recorded.get("profiles_file") or "")
    if recorded.get("file_existed") is False and path.is_file():
        # up.sh created the profiles file; remove it again when nothing else was added to it.
        if not load_profiles(include_defaults=False).names:
            path.unlink()
    state.unlink()
    print(profiles.active_name or "")


def main(argv: list[str]) -> None:
    if not argv:
        _fail(__doc__)
    cmd, args = argv[0], argv[1:]
    if cmd == "spawn":
        if "--" not in args:
            _fail("spawn LOG PIDFILE -- CMD...")
        i = args.index("--")
        spawn(args[0], args[1], args[i + 1 :])
    elif cmd == "pid-state":
        print(pid_state(args[0]))
    elif cmd == "wait-http":
        wait_http(args[0], float(args[1]), args[2], args[3] if len(args) > 3 else None)
    elif cmd == "wait-worker":
        wait_worker(args[0], args[1], args[2], float(args[3]), args[4], args[5])
    elif cmd == "ensure-db":
        ensure_db(args[0])
    elif cmd == "drop-db":
        drop_db(args[0])
    elif cmd == "save-mlflow-config":
        save_mlflow_config(args[0])
    elif cmd == "save-api-settings":
        save_api_settings(args[0], args[1], args[2])
    elif cmd == "profile-activate":
        profile_activate(args[0], args[1], args[2])
    elif cmd == "profile-restore":
        profile_restore(args[0])
    elif cmd == "ensure-bucket":
        ensure_bucket(args[0], args[1])
    elif cmd == "save-production-blocks":
        save_production_blocks(args[0], args[1])
    elif cmd == "crash-automation":
        crash_automation(args[0])
    elif cmd == "schedules-snapshot":
        schedules_snapshot(args[0])
    elif cmd == "schedules-keep":
        schedules_keep(args[0], args[1])
    elif cmd == "git-prefect-file":
        if len(args) not in (3, 4):
            _fail("git-prefect-file REPOSITORY COMMIT OUT [WORK_POOL]")
        git_prefect_file(*args)
    else:
        _fail(f"unknown command {cmd!r}\n{__doc__}")


if __name__ == "__main__":
    main(sys.argv[1:])
