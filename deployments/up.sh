#!/usr/bin/env bash
# Bring up the local mlops-flows stack (`make up`; the end-to-end tests run this same script):
#
#   Prefect server + UI   http://127.0.0.1:$PREFECT_PORT      (SQLite, or PREFECT_DATABASE_URL)
#   MLflow server + UI    http://127.0.0.1:$MLFLOW_PORT       (SQLite, or MLFLOW_BACKEND_STORE_URI;
#                                                              artifacts served from the stack dir)
#   block types registered, MLflowConfig "default" -> the MLflow server
#   work pool "mlops" (process) + every deployment in prefect.yaml (`prefect deploy --all`)
#   a process worker polling queue "ml-retraining-queue"
#   REST API              http://127.0.0.1:$MLOPS_API_PORT     (api/; JSON log in logs/api.log)
#                         an admin key on first start in $MLOPS_STACK_DIR/api-key (mode 600)
#   Prefect profile "mlops" (PREFECT_API_URL -> this server) made active; down.sh restores yours
#
# Idempotent: services already running are kept, configuration is re-applied (re-run it after
# editing prefect.yaml). Stop with deployments/down.sh (`make down`); data stays in the stack dir.
#
# Settings (environment variables, defaults in brackets):
#   PREFECT_PORT [4200]  MLFLOW_PORT [5000]  MLOPS_API_PORT [8000]  MLOPS_HOST [127.0.0.1]
#   MLOPS_STACK_DIR [.mlops/stack]    PIDs, logs, SQLite databases, MLflow artifacts, PREFECT_HOME
#   PREFECT_DATABASE_URL              e.g. postgresql+asyncpg://postgres@127.0.0.1:5432/prefect
#   MLFLOW_BACKEND_STORE_URI          e.g. postgresql://postgres@127.0.0.1:5432/mlflow
#                                     (PostgreSQL databases are created when absent)
#   MLOPS_PREFECT_PROFILE [mlops]     '' leaves your Prefect profiles alone (then export the
#                                     PREFECT_API_URL printed at the end)
#   MLFLOW_WORKERS [1]  PREFECT_WORKER_QUERY_SECONDS [1]  MLOPS_START_TIMEOUT [180]
#   MLOPS_API_WORKERS [2]             uvicorn workers of the REST API (/metrics sums them all)
#   MLOPS_HEARTBEAT_SECONDS [30]      flow runs of the worker send a heartbeat this often; an
#                                     automation marks a run Crashed after 3 missed (min 30)
#   MLOPS_LOG_LEVEL [INFO]            log level of the servers, the worker and the flow runs
#   MLOPS_LOG_FORMAT [json]           json: the worker, its flow runs and the API log JSON lines
#   MLOPS_PYTHON [.venv/bin/python]   the interpreter with the project's requirements
#   MLOPS_CODE_SOURCE [checkout]      checkout: runs change to this folder (one machine); git: runs
#                                     clone MLOPS_GIT_REPOSITORY [git remote origin] at this
#                                     checkout's HEAD, so workers on other machines run the same
#                                     code (README "Workers on other machines")
#   MLOPS_PROFILE [embedded]          which stores the flows share (`make up PROFILE=production`):
#     embedded     SQLite databases and artifacts in the stack dir; the flows' A/B store, scored
#                  batches and export copies in their state folder ($MLOPS_HOME, else ./.mlops):
#                  everything on this machine
#     production   nothing a later step needs on a worker's disk (README "Production profile"):
#                  Prefect, MLflow and the A/B store on PostgreSQL -- PREFECT_DATABASE_URL
#                  [postgresql+asyncpg://$MLOPS_PG/mlops_prefect], MLFLOW_BACKEND_STORE_URI
#                  [postgresql://$MLOPS_PG/mlops_mlflow], MLOPS_AB_DATABASE_URL
#                  [postgresql://$MLOPS_PG/mlops_ab], MLOPS_PG [postgres@127.0.0.1:5432];
#                  MLflow artifacts, exports, scored batches and Prefect results in one S3 bucket,
#                  MLOPS_S3_BUCKET [mlops], at MLOPS_S3_ENDPOINT_URL (MinIO or any S3 API; empty:
#                  a moto S3 server on $MLOPS_HOST:MLOPS_S3_PORT [9000] that keeps objects in
#                  memory, a stand-in for trying it) with the keys AWS_ACCESS_KEY_ID /
#                  AWS_SECRET_ACCESS_KEY [a fixed test pair for the moto server]. The MLflow server
#                  proxies the artifacts (clients need no S3 keys); the blocks S3Bucket
#                  "mlops-s3" / "mlops-results", ABPolicy and ExportSettings "default" say where
#                  each store is, and the Prefect server's default result storage is
#                  "mlops-results", so every worker reads them from the Prefect API.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
cd "$ROOT"

HOST="${MLOPS_HOST:-127.0.0.1}"
PREFECT_PORT="${PREFECT_PORT:-4200}"
MLFLOW_PORT="${MLFLOW_PORT:-5000}"
API_PORT="${MLOPS_API_PORT:-8000}"
LOG_FORMAT="${MLOPS_LOG_FORMAT:-json}"
STACK_DIR="${MLOPS_STACK_DIR:-$ROOT/.mlops/stack}"
PROFILE="${MLOPS_PREFECT_PROFILE-mlops}"
TIMEOUT="${MLOPS_START_TIMEOUT:-180}"
LOG_LEVEL="${MLOPS_LOG_LEVEL:-INFO}"
WORK_POOL="mlops"                  # fixed: prefect.yaml names it
WORK_QUEUE="ml-retraining-queue"   # fixed: prefect.yaml names it
WORKER_NAME="mlops-worker"
PY="${MLOPS_PYTHON:-$ROOT/.venv/bin/python}"
if [ ! -x "$PY" ]; then
  echo "error: no Python at $PY (run 'make venv' or set MLOPS_PYTHON)" >&2
  exit 1
fi

mkdir -p "$STACK_DIR"
STACK_DIR="$(cd "$STACK_DIR" && pwd -P)"
LOGS="$STACK_DIR/logs"
PIDS="$STACK_DIR/pids"
mkdir -p "$LOGS" "$PIDS" "$STACK_DIR/prefect" "$STACK_DIR/mlflow/artifacts"

PREFECT_API="http://$HOST:$PREFECT_PORT/api"
PREFECT_UI="http://$HOST:$PREFECT_PORT"
MLFLOW_URI="http://$HOST:$MLFLOW_PORT"
API_URL="http://$HOST:$API_PORT"
JSON_LOGGING="$ROOT/deployments/logging-json.yml"
# With JSON logs, the worker and the flow runs it starts load Prefect's logging configuration with a
# JSON console handler; the API loads it itself (MLOPS_LOG_FORMAT=json).
log_env=()
[ "$LOG_FORMAT" = json ] && log_env=(PREFECT_LOGGING_SETTINGS_PATH="$JSON_LOGGING")
STACK_PROFILE="${MLOPS_PROFILE:-embedded}"
S3_ENDPOINT="" S3_BUCKET="" AB_DB="" START_S3=0
MLFLOW_ARTIFACTS="$STACK_DIR/mlflow/artifacts"
case "$STACK_PROFILE" in
  embedded) ;;
  production)
    PG="${MLOPS_PG:-postgres@127.0.0.1:5432}"
    PREFECT_DATABASE_URL="${PREFECT_DATABASE_URL:-postgresql+asyncpg://$PG/mlops_prefect}"
    MLFLOW_BACKEND_STORE_URI="${MLFLOW_BACKEND_STORE_URI:-postgresql://$PG/mlops_mlflow}"
    AB_DB="${MLOPS_AB_DATABASE_URL:-postgresql://$PG/mlops_ab}"
    S3_BUCKET="${MLOPS_S3_BUCKET:-mlops}"
    S3_PORT="${MLOPS_S3_PORT:-9000}"
    S3_ENDPOINT="${MLOPS_S3_ENDPOINT_URL:-}"
    if [ -z "$S3_ENDPOINT" ]; then
      S3_ENDPOINT="http://$HOST:$S3_PORT"
      START_S3=1
    fi
    # Only the MLflow server and the block setup get the keys (the S3Bucket blocks hold them for
    # the flows): the worker, its runs and the API never see them in their environment.
    s3_env=(AWS_ACCESS_KEY_ID="${AWS_ACCESS_KEY_ID:-mlops-local}"
            AWS_SECRET_ACCESS_KEY="${AWS_SECRET_ACCESS_KEY:-mlops-local-secret}"
            AWS_DEFAULT_REGION="${AWS_DEFAULT_REGION:-us-east-1}")
    MLFLOW_ARTIFACTS="s3://$S3_BUCKET/mlflow-artifacts"
    ;;
  *) echo "error: MLOPS_PROFILE (make up PROFILE=...) must be embedded or production, not" \
       "'$STACK_PROFILE'" >&2; exit 1 ;;
esac
PREFECT_DB="${PREFECT_DATABASE_URL:-sqlite+aiosqlite:///$STACK_DIR/prefect/prefect.db}"
MLFLOW_DB="${MLFLOW_BACKEND_STORE_URI:-sqlite:///$STACK_DIR/mlflow/mlflow.db}"
# SQLAlchemy 2.1 maps a bare postgresql:// to psycopg (3), which is not installed: name the drivers
# the servers need (asyncpg for Prefect, psycopg2 for MLflow).
case "$PREFECT_DB" in
  postgresql://* | postgres://*) PREFECT_DB="postgresql+asyncpg://${PREFECT_DB#*://}" ;;
esac
case "$MLFLOW_DB" in
  postgresql://* | postgres://*) MLFLOW_DB="postgresql+psycopg2://${MLFLOW_DB#*://}" ;;
esac
case "$AB_DB" in
  postgresql://* | postgres://*) AB_DB="postgresql+psycopg2://${AB_DB#*://}" ;;
esac
started_at=$SECONDS

# Keep the caller's Prefect profile location for the profile step at the end; everything the
# stack runs uses its own PREFECT_HOME so it never reads or writes ~/.prefect.
USER_PREFECT_HOME="${PREFECT_HOME-}"
USER_PREFECT_PROFILES_PATH="${PREFECT_PROFILES_PATH-}"
USER_PREFECT_API_URL="${PREFECT_API_URL-}"
USER_PREFECT_PROFILE="${PREFECT_PROFILE-}"
unset PREFECT_PROFILE PREFECT_API_KEY PREFECT_API_DATABASE_CONNECTION_URL
export PREFECT_HOME="$STACK_DIR/prefect"
export PREFECT_PROFILES_PATH="$PREFECT_HOME/profiles.toml"
export PREFECT_API_URL="$PREFECT_API"
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_LOGGING_LEVEL="$LOG_LEVEL"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export GIT_PYTHON_REFRESH="${GIT_PYTHON_REFRESH:-quiet}"
# Loopback traffic never goes through a proxy configured in the environment.
export NO_PROXY="${NO_PROXY:+$NO_PROXY,}$HOST,127.0.0.1,localhost" no_proxy="${no_proxy:+$no_proxy,}$HOST,127.0.0.1,localhost"

say() { printf '[up] %s\n' "$*"; }
on_exit() {
  local rc=$?
  if [ "$rc" -ne 0 ] && [ -n "$(ls "$PIDS" 2>/dev/null)" ]; then
    echo "[up] failed (exit $rc). Logs: $LOGS. What did start keeps running: stop it with" \
      "'make down' (MLOPS_STACK_DIR=$STACK_DIR bash deployments/down.sh)" >&2
  fi
}
trap on_exit EXIT
stack() { "$PY" "$ROOT/deployments/stack.py" "$@"; }
prefect_cli() { "$PY" -m prefect --no-prompt "$@"; }
# The database URL with any password hidden, for printing.
redact() { sed -E 's#(://[^:/@]+):[^@]*@#\1:***@#' <<<"$1"; }

running() {  # running NAME -> 0 when the process recorded in pids/NAME.pid is alive and ours
  [ -f "$PIDS/$1.pid" ] && [ "$(stack pid-state "$PIDS/$1.pid")" = ours ]
}

port_busy() { (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null; }

# The settings a running stack was started with must match this invocation's.
SETTINGS="$STACK_DIR/stack.settings"
current_settings="HOST=$HOST PREFECT_PORT=$PREFECT_PORT MLFLOW_PORT=$MLFLOW_PORT PREFECT_DB=$(redact "$PREFECT_DB") MLFLOW_DB=$(redact "$MLFLOW_DB")"
[ "$STACK_PROFILE" = production ] && current_settings="$current_settings PROFILE=production AB_DB=$(redact "$AB_DB") S3=$S3_ENDPOINT/$S3_BUCKET"
if { running prefect-server || running mlflow-server || running worker || running s3-server; } && [ -f "$SETTINGS" ]; then
  if [ "$(cat "$SETTINGS")" != "$current_settings" ]; then
    echo "error: a stack is already running in $STACK_DIR with other settings:" >&2
    echo "  running:   $(cat "$SETTINGS")" >&2
    echo "  requested: $current_settings" >&2
    echo "run deployments/down.sh (make down) first, or use another MLOPS_STACK_DIR" >&2
    exit 1
  fi
fi
echo "$current_settings" >"$SETTINGS"

start_service() {  # start_service NAME PORT|- CMD... (skips when already running)
  local name=$1 port=$2
  shift 2
  if running "$name"; then
    say "$name already running (pid $(cut -d' ' -f1 "$PIDS/$name.pid"))"
    return 0
  fi
  if [ "$port" != - ] && port_busy "$port"; then
    echo "error: port $port on $HOST is in use by another program: stop it or choose another" \
      "port (PREFECT_PORT / MLFLOW_PORT)" >&2
    exit 1
  fi
  local pid
  pid=$(stack spawn "$LOGS/$name.log" "$PIDS/$name.pid" -- "$@")
  say "$name starting (pid $pid, log $LOGS/$name.log)"
}

# ---- pre-flight: ports of the servers still to start must be free -------------------------------
service_ports=("prefect-server:$PREFECT_PORT" "mlflow-server:$MLFLOW_PORT" "api:$API_PORT")
[ "$START_S3" = 1 ] && service_ports+=("s3-server:$S3_PORT")
for service_port in "${service_ports[@]}"; do
  if ! running "${service_port%%:*}" && port_busy "${service_port##*:}"; then
    echo "error: port ${service_port##*:} on $HOST (for the ${service_port%%:*}) is in use by another" \
      "program: stop it or choose another port (PREFECT_PORT / MLFLOW_PORT / MLOPS_API_PORT /" \
      "MLOPS_S3_PORT)" >&2
    exit 1
  fi
done

# ---- databases --------------------------------------------------------------------------------
for url in "$PREFECT_DB" "$MLFLOW_DB" ${AB_DB:+"$AB_DB"}; do
  if [[ "$url" == postgresql* ]]; then
    msg=$(stack ensure-db "$url")
    say "$msg"
  fi
done

# ---- servers (started together, then awaited) --------------------------------------------------
# The production profile's stand-in for MinIO: moto's S3 server (objects in memory).
if [ "$START_S3" = 1 ]; then
  if ! "$PY" -c "import moto.server" 2>/dev/null; then
    echo "error: the production profile without MLOPS_S3_ENDPOINT_URL starts moto's S3 server," \
      "which is not installed in $PY: run 'make venv-dev' (or pip install 'moto[server]'), or" \
      "name your S3/MinIO endpoint in MLOPS_S3_ENDPOINT_URL" >&2
    exit 1
  fi
  start_service s3-server "$S3_PORT" "$PY" -m moto.server -H "$HOST" -p "$S3_PORT"
fi
# Concurrency leases (a retraining's hold on its model's one slot) in files under PREFECT_HOME
# instead of the server's memory: with the default memory storage a server restart forgot every
# lease while the limit still counted the slot as taken, so the model could never retrain again.
PREFECT_SERVER_DATABASE_CONNECTION_URL="$PREFECT_DB" PREFECT_SERVER_LOGGING_LEVEL="$LOG_LEVEL" \
PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE="${PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE:-prefect.server.concurrency.lease_storage.filesystem}" \
  start_service prefect-server "$PREFECT_PORT" \
  "$PY" -m prefect server start --host "$HOST" --port "$PREFECT_PORT" --analytics-off

# Job execution (huey consumers, for GenAI judges) is off: it costs ~1 GB of RAM and is unused here.
# The backend store URI goes through the environment (MLFLOW_BACKEND_STORE_URI), not argv: `ps`
# would show a password.
# In production the server alone talks to S3 (MLFLOW_S3_ENDPOINT_URL + keys): clients upload and
# download artifacts through it (mlflow-artifacts:/ URIs).
mlflow_env=()
[ "$STACK_PROFILE" = production ] && mlflow_env=("${s3_env[@]}" MLFLOW_S3_ENDPOINT_URL="$S3_ENDPOINT")
MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}" \
  MLFLOW_BACKEND_STORE_URI="$MLFLOW_DB" \
  start_service mlflow-server "$MLFLOW_PORT" \
  env "${mlflow_env[@]}" "$PY" -m mlflow server --host "$HOST" --port "$MLFLOW_PORT" \
  --workers "${MLFLOW_WORKERS:-1}" \
  --serve-artifacts --artifacts-destination "$MLFLOW_ARTIFACTS" \
  --allowed-hosts "$HOST:$MLFLOW_PORT,$HOST,localhost:$MLFLOW_PORT,localhost,127.0.0.1:$MLFLOW_PORT,127.0.0.1"

stack wait-http "$PREFECT_API/health" "$TIMEOUT" "$PIDS/prefect-server.pid" "$LOGS/prefect-server.log"
say "Prefect server answers at $PREFECT_API ($((SECONDS - started_at)) s)"
stack wait-http "$MLFLOW_URI/health" "$TIMEOUT" "$PIDS/mlflow-server.pid" "$LOGS/mlflow-server.log"
say "MLflow server answers at $MLFLOW_URI ($((SECONDS - started_at)) s)"
if [ "$STACK_PROFILE" = production ]; then
  [ "$START_S3" = 1 ] && stack wait-http "$S3_ENDPOINT/moto-api/data.json" "$TIMEOUT" \
    "$PIDS/s3-server.pid" "$LOGS/s3-server.log"
fi

# ---- configuration ------------------------------------------------------------------------------
prefect_cli block register -m blocks >"$LOGS/setup.log" 2>&1 \
  || { cat "$LOGS/setup.log" >&2; exit 1; }
say "block types registered (prefect block register -m blocks)"
msg=$(stack save-mlflow-config "$MLFLOW_URI")
say "$msg"
if [ "$STACK_PROFILE" = production ]; then  # the bucket first, then the blocks naming it
  env "${s3_env[@]}" MLOPS_AB_DATABASE_URL="$AB_DB" \
    "$PY" "$ROOT/deployments/stack.py" save-production-blocks "$S3_ENDPOINT" "$S3_BUCKET" \
    | while read -r line; do say "$line"; done
fi
HEARTBEAT_S="${MLOPS_HEARTBEAT_SECONDS:-30}"
msg=$(stack crash-automation "$HEARTBEAT_S")
say "$msg"

if out=$(prefect_cli work-pool create "$WORK_POOL" --type process 2>&1); then
  say "work pool $WORK_POOL created (process)"
elif grep -q "already exists" <<<"$out"; then
  say "work pool $WORK_POOL exists"
else
  echo "$out" >&2
  exit 1
fi

# The worker starts now (it takes a few seconds) and is awaited after the deploy.
PREFECT_WORKER_QUERY_SECONDS="${PREFECT_WORKER_QUERY_SECONDS:-1}" \
PREFECT_FLOWS_HEARTBEAT_FREQUENCY="$HEARTBEAT_S" \
  start_service worker - \
  env "${log_env[@]}" "$PY" -m prefect worker start --pool "$WORK_POOL" --work-queue "$WORK_QUEUE" \
  --name "$WORKER_NAME" --type process

# `prefect deploy` records the project root of this checkout in every deployment's pull step
# (see prefect.yaml), so deploy from the root. With MLOPS_CODE_SOURCE=git the pull step clones the
# repository at this checkout's commit instead (deployments/stack.py git-prefect-file).
deploy_args=(--all)
case "${MLOPS_CODE_SOURCE:-checkout}" in
  checkout) ;;
  git)
    repository="${MLOPS_GIT_REPOSITORY:-$(git -C "$ROOT" remote get-url origin 2>/dev/null || true)}"
    commit="$(git -C "$ROOT" rev-parse HEAD)"
    if [ -z "$repository" ]; then
      echo "error: MLOPS_CODE_SOURCE=git needs MLOPS_GIT_REPOSITORY (no git remote 'origin' here)" >&2
      exit 1
    fi
    if [ -n "$(git -C "$ROOT" status --porcelain --untracked-files=no)" ]; then
      echo "warning: uncommitted changes are not deployed: runs use commit ${commit:0:12}" >&2
    fi
    stack git-prefect-file "$repository" "$commit" "$STACK_DIR/prefect.git.yaml" >/dev/null
    deploy_args+=(--prefect-file "$STACK_DIR/prefect.git.yaml")
    say "code source: $repository at ${commit:0:12} (every run clones it)"
    ;;
  *) echo "error: MLOPS_CODE_SOURCE must be checkout or git, not '$MLOPS_CODE_SOURCE'" >&2; exit 1 ;;
esac
# `prefect deploy` resets the schedules prefect.yaml names and, where a deployment has one without a
# slug, replaces all of them: note them first, then put back what a user set elsewhere (README
# "Schedules", "After a re-up").
stack schedules-snapshot "$STACK_DIR/schedules.before.json" >/dev/null
if ! prefect_cli deploy "${deploy_args[@]}" >"$LOGS/deploy.log" 2>&1; then
  tail -n 40 "$LOGS/deploy.log" >&2
  echo "error: prefect deploy --all failed (full log: $LOGS/deploy.log)" >&2
  exit 1
fi
say "deployments applied (prefect deploy --all): $(grep -cE "Deployment '.*' successfully (created|updated)" "$LOGS/deploy.log" || true) from prefect.yaml"
msg=$(stack schedules-keep "$STACK_DIR/schedules.before.json" "$STACK_DIR/schedules.applied.json")
say "$msg"

# ---- worker -------------------------------------------------------------------------------------
stack wait-worker "$PREFECT_API" "$WORK_POOL" "$WORKER_NAME" "$TIMEOUT" "$PIDS/worker.pid" "$LOGS/worker.log"
say "worker $WORKER_NAME online, polling $WORK_POOL/$WORK_QUEUE"

# ---- REST API -----------------------------------------------------------------------------------
# Settings in the APISettings block (keys hashed in the stack dir), an admin key on first start
# (written to a mode-600 file, never printed or logged), then the service with JSON logs.
msg=$(stack save-api-settings "$HOST" "$API_PORT" "$STACK_DIR/api/keys.json")
say "$msg"
API_KEY_FILE="$STACK_DIR/api-key"
if [ ! -s "$API_KEY_FILE" ]; then
  "$PY" -m api.keys --file "$STACK_DIR/api/keys.json" revoke admin >/dev/null 2>&1 || true
  "$PY" -m api.keys --file "$STACK_DIR/api/keys.json" create admin --scope admin \
    --output "$API_KEY_FILE" >>"$LOGS/setup.log" 2>&1 || { cat "$LOGS/setup.log" >&2; exit 1; }
  say "admin API key created: $API_KEY_FILE (mode 600)"
fi
MLOPS_LOG_FORMAT="$LOG_FORMAT" MLOPS_LOG_LEVEL="$LOG_LEVEL" \
  start_service api "$API_PORT" "$PY" -m api --host "$HOST" --port "$API_PORT" \
    --workers "${MLOPS_API_WORKERS:-2}"
stack wait-http "$API_URL/health" "$TIMEOUT" "$PIDS/api.pid" "$LOGS/api.log"
say "REST API answers at $API_URL (OpenAPI: $API_URL/docs)"

# ---- the user's side: a Prefect profile and an env file -------------------------------------------
(umask 077 && cat >"$STACK_DIR/env" <<EOF
# source this file to talk to the stack from a shell (it holds the admin API key: mode 600)
export PREFECT_API_URL=$PREFECT_API
export MLFLOW_TRACKING_URI=$MLFLOW_URI
export MLOPS_API_URL=$API_URL
export MLOPS_API_KEY=$(cat "$API_KEY_FILE")
EOF
)
chmod 600 "$STACK_DIR/env"
profile_note=""
if [ -n "$PROFILE" ]; then
  (
    unset PREFECT_HOME PREFECT_PROFILES_PATH PREFECT_API_URL
    [ -n "$USER_PREFECT_HOME" ] && export PREFECT_HOME="$USER_PREFECT_HOME"
    [ -n "$USER_PREFECT_PROFILES_PATH" ] && export PREFECT_PROFILES_PATH="$USER_PREFECT_PROFILES_PATH"
    stack profile-activate "$PROFILE" "$PREFECT_API" "$STACK_DIR/profile.json" >/dev/null
  )
  profile_note="Prefect profile '$PROFILE' is active (PREFECT_API_URL=$PREFECT_API); down.sh restores the previous one."
fi
if [ -n "$USER_PREFECT_API_URL$USER_PREFECT_PROFILE" ] && [ "$USER_PREFECT_API_URL" != "$PREFECT_API" ]; then
  profile_note="${profile_note:+$profile_note
  }NOTE: this shell sets PREFECT_API_URL/PREFECT_PROFILE, which win over the profile: export the line below."
fi

rss_mb=$(ps -eo pgid=,rss= | awk -v ids=" $(cat "$PIDS"/*.pid | cut -d' ' -f1 | xargs) " \
  'index(ids, " " $1 " ") { s += $2 } END { printf "%d", s / 1024 }')
cat <<EOF

mlops stack is up ($((SECONDS - started_at)) s, ~${rss_mb} MB resident) — state in $STACK_DIR
  Prefect UI    $PREFECT_UI          database: $(redact "$PREFECT_DB")
  Prefect API   $PREFECT_API
  MLflow        $MLFLOW_URI          database: $(redact "$MLFLOW_DB")
  profile       $STACK_PROFILE${AB_DB:+          A/B store: $(redact "$AB_DB")}${S3_BUCKET:+
  S3            $S3_ENDPOINT  bucket $S3_BUCKET (MLflow artifacts, exports, scored batches, Prefect results)}
  REST API      $API_URL/docs        admin key in $API_KEY_FILE (MLOPS_API_KEY in $STACK_DIR/env)
  work pool     $WORK_POOL / queue $WORK_QUEUE, worker $WORKER_NAME
  logs          $LOGS
${profile_note:+  $profile_note
}
Run a deployment from any shell:
  prefect deployment run 'train-model/default' --param data=/abs/path/to.csv --param target=y --param model_name=my-model --watch
If your shell sets PREFECT_API_URL or PREFECT_PROFILE, or to skip the profile (MLOPS_PREFECT_PROFILE=''):
  export PREFECT_API_URL=$PREFECT_API   # or: source $STACK_DIR/env
Stop: make down  (bash deployments/down.sh)
EOF
