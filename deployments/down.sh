#!/usr/bin/env bash
# Stop what deployments/up.sh started (`make down`): the REST API, the worker, the MLflow server,
# the Prefect server and the production profile's S3 server, each as a whole process group, by
# the PIDs up.sh recorded in $MLOPS_STACK_DIR/pids.
# Restores the Prefect profile that was active before up.sh. Data (databases, artifacts, logs)
# stays in the stack dir; `make clean` removes .mlops. Safe to call twice, or with nothing running.
#
# Settings: MLOPS_STACK_DIR [.mlops/stack] (the one up.sh used), MLOPS_STOP_TIMEOUT [20] seconds
# before SIGKILL, MLOPS_PYTHON [.venv/bin/python].
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
cd "$ROOT"  # a relative MLOPS_STACK_DIR means the same folder as for up.sh
STACK_DIR="${MLOPS_STACK_DIR:-$ROOT/.mlops/stack}"
STOP_TIMEOUT="${MLOPS_STOP_TIMEOUT:-20}"
PY="${MLOPS_PYTHON:-$ROOT/.venv/bin/python}"
PIDS="$STACK_DIR/pids"

say() { printf '[down] %s\n' "$*"; }

group_alive() { kill -0 -- "-$1" 2>/dev/null; }

stop() {  # stop NAME: TERM the process group recorded in pids/NAME.pid, KILL after the timeout
  local name=$1 file="$PIDS/$1.pid" pid
  [ -f "$file" ] || return 0
  read -r pid _ <"$file" || true
  if [ -z "${pid:-}" ]; then rm -f "$file"; return 0; fi
  # The pid is our process only if its start matches the record (deployments/stack.py pid-state);
  # if the leader is gone but the group still has members, they are ours (Linux does not reuse a
  # pid that names a live group).
  if [ "$("$PY" "$ROOT/deployments/stack.py" pid-state "$file")" = other ]; then
    say "$name: pid $pid belongs to another program now; nothing to stop"
    rm -f "$file"
    return 0
  fi
  if ! group_alive "$pid"; then
    say "$name: not running"
    rm -f "$file"
    return 0
  fi
  local t0=$SECONDS groups="$pid" child
  # The process worker starts each flow run in a session of its own: stop those groups too.
  for child in $(ps -eo pid=,ppid= | awk -v p="$pid" '$2 == p { print $1 }'); do
    [ "$(ps -o pgid= -p "$child" 2>/dev/null | xargs)" = "$child" ] && groups="$groups $child"
  done
  for g in $groups; do kill -TERM -- "-$g" 2>/dev/null || true; done
  local waited=0 alive
  while :; do
    alive=""
    for g in $groups; do group_alive "$g" && alive="$alive $g"; done
    [ -z "$alive" ] && break
    if [ "$waited" -ge $((STOP_TIMEOUT * 4)) ]; then
      say "$name: still running after ${STOP_TIMEOUT}s, sending SIGKILL"
      for g in $alive; do kill -KILL -- "-$g" 2>/dev/null || true; done
      sleep 0.5
      break
    fi
    sleep 0.25
    waited=$((waited + 1))
  done
  say "$name stopped (process group(s) $groups, $((SECONDS - t0)) s)"
  rm -f "$file"
}

if [ -d "$PIDS" ]; then
  # The worker (and its flow runs) first, so it does not log errors about a vanished API; then
  # both servers at once.
  found=0
  for name in api worker mlflow-server prefect-server s3-server; do
    [ -f "$PIDS/$name.pid" ] && found=1
  done
  stop api
  stop worker
  stop mlflow-server &
  stop prefect-server &
  wait
  stop s3-server  # last: the MLflow server may still be writing artifacts to it
  [ "$found" = 1 ] || say "nothing running (no PIDs recorded in $PIDS)"
else
  say "no stack in $STACK_DIR"
fi

if [ -f "$STACK_DIR/profile.json" ] && [ -x "$PY" ]; then
  restored=$("$PY" "$ROOT/deployments/stack.py" profile-restore "$STACK_DIR/profile.json" 2>&1) \
    && say "Prefect profile restored: ${restored:-default}" \
    || say "could not restore the Prefect profile: $restored"
fi
rm -f "$STACK_DIR/stack.settings"
