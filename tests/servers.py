"""Helpers for tests that run real servers as subprocesses (MLflow, moto's S3 server, …)."""
from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Callable


def free_port() -> int:
    """A loopback port nothing listens on now (the caller's server binds it next)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_answers(process: subprocess.Popen, answers: Callable[[], bool], timeout_s: float,
                       log_path: Path, what: str, every_s: float = 0.25) -> None:
    """Poll `answers()` (False or an OSError: not yet) until it is True. If the server exits
    first or `timeout_s` passes, stop its process group and raise RuntimeError with its log's
    tail, so a test that cannot start its server says why."""
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{what} exited with {process.returncode}:\n"
                                   f"{log_tail(log_path)}")
            try:
                if answers():
                    return
            except OSError:  # refused, reset, timed out, an HTTP error status: not up yet
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not answer within {timeout_s:.0f} s:\n"
                                   f"{log_tail(log_path)}")
            time.sleep(every_s)
    except BaseException:
        stop_process_group(process)
        raise


def log_tail(path: Path, n: int = 40) -> str:
    """The last lines of a server's log, for a failure message."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def stop_process_group(process: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM the server's own process group (servers fork workers), then SIGKILL."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=timeout)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


class _LoopbackProxy:
    """A TCP proxy on loopback in front of `target_port`: accepts clients, connects each to the
    target and hands the pair to `_serve(client, upstream)`. A client that arrives while the
    target is down sees its connection drop (counted in `refused`), as it would without us."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.refused = 0
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
                upstream.settimeout(None)
            except OSError:
                self.refused += 1
                client.close()
                continue
            self._serve(client, upstream)

    def _serve(self, client, upstream) -> None:
        raise NotImplementedError

    @staticmethod
    def _shut(*sockets) -> None:
        """shutdown, not only close: a close does not wake the other direction's thread blocked
        in recv, and the peer would never see the connection end."""
        for s in sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self._closed = True
        self._listener.close()


class WatchingProxy(_LoopbackProxy):
    """A TCP proxy on loopback in front of a test server: it passes bytes through unchanged and
    calls `on_request(request_line)` before forwarding each HTTP request it sees from a client, so
    a test can stop the server (by its PID) at an exact point of a client's conversation -- e.g.
    right before the request that creates a model version. The fault itself stays real: the
    server process is stopped or killed, and the client sees what it would see."""

    METHODS = (b"GET ", b"POST ", b"PUT ", b"PATCH ", b"DELETE ", b"HEAD ")

    def __init__(self, target_port: int, on_request=None):
        self.on_request = on_request or (lambda line: None)
        self.seen: list[str] = []
        super().__init__(target_port)
        self.url = f"http://127.0.0.1:{self.port}"

    def _serve(self, client, upstream) -> None:
        threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
        threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, source, sink, from_client: bool) -> None:
        try:
            while chunk := source.recv(65536):
                if from_client and chunk.startswith(self.METHODS):
                    line = chunk.split(b"\r\n", 1)[0].decode("latin-1")
                    self.seen.append(line)
                    self.on_request(line)
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            self._shut(source, sink)


class PrivatePostgres:
    """A throw-away PostgreSQL cluster (initdb + pg_ctl) on its own loopback port, for tests that
    restart or stop the database: never the shared server other tests use at the same time.

    The binaries come from PATH or /usr/lib/postgresql/<newest>/bin. PostgreSQL refuses to run
    as root: under root the cluster belongs to the `postgres` user (its folder is chowned and
    every command runs through `runuser -u postgres`). fsync is off: the faults kill the server
    process, never the machine, so the operating system still holds every write."""

    def __init__(self, port: int):
        found = shutil.which("pg_ctl")
        if found:
            self.bin = Path(found).parent
        else:
            versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
                              key=lambda p: int(Path(p).parts[-3]))
            if not versions:
                raise RuntimeError("no PostgreSQL server binaries (pg_ctl, initdb): install the "
                                   "postgresql package")
            self.bin = Path(versions[-1]).parent
        self.port = port
        self.root = Path(tempfile.mkdtemp(prefix="mlops-private-pg-"))
        self.data, self.log = self.root / "data", self.root / "server.log"
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            shutil.chown(self.root, "postgres", "postgres")

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        command = [str(self.bin / args[0]), *args[1:]]
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}): "
                               f"{done.stderr.strip() or done.stdout.strip()}\n{log_tail(self.log)}")
        return done

    def start(self) -> "PrivatePostgres":
        if not self.data.exists():
            self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust",
                      "-E", "UTF8", "--no-sync")
        options = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
                   "-c max_connections=50")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w",
                  "-t", "60", "start")
        return self

    def restart(self, mode: str = "fast") -> None:
        """`fast` ends every session with an error; `immediate` kills the server without a
        checkpoint (crash recovery at start)."""
        # -l again: without it the new server writes to pg_ctl's stdout pipe and keeps it open
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-m", mode, "-w",
                  "-t", "60", "restart")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/{database}?sslmode=disable"

    def create_database(self, name: str) -> str:
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user="postgres",
                                dbname="postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        conn.close()
        return self.url(name)

    def close(self) -> None:
        if (self.data / "postmaster.pid").exists():
            try:
                self.stop("immediate")
            except (RuntimeError, subprocess.TimeoutExpired):
                pass
        shutil.rmtree(self.root, ignore_errors=True)


class CommitAckCutter(_LoopbackProxy):
    """A TCP proxy on loopback in front of PostgreSQL that, once `armed`, lets the next COMMIT
    reach the server, waits for the server's answer (the transaction is durable then), and cuts
    both connections instead of passing the answer on: the client sees its COMMIT fail although
    it took effect -- the lost acknowledgement of a restart, made deterministic. `on_cut()` runs
    after the cut (a test restarts the server there). `refused` counts the clients that came
    while the server was down."""

    COMMIT = b"Q\x00\x00\x00\x0bCOMMIT\x00"  # protocol 3 simple query "COMMIT"

    def __init__(self, target_port: int, on_cut=None):
        self.on_cut = on_cut or (lambda: None)
        self.armed = threading.Event()
        self.cuts = 0
        super().__init__(target_port)

    def url(self, database: str) -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/{database}?sslmode=disable"

    def _serve(self, client, upstream) -> None:
        state = {"commit_sent": False}
        threading.Thread(target=self._up, args=(client, upstream, state), daemon=True).start()
        threading.Thread(target=self._down, args=(upstream, client, state), daemon=True).start()

    def _up(self, client, server, state) -> None:
        try:
            while chunk := client.recv(65536):
                if self.armed.is_set() and self.COMMIT in chunk:
                    state["commit_sent"] = True
                server.sendall(chunk)
        except OSError:
            pass
        finally:
            self._shut(client, server)

    def _down(self, server, client, state) -> None:
        try:
            while chunk := server.recv(65536):
                if state["commit_sent"] and self.armed.is_set():
                    self.armed.clear()  # the answer to COMMIT: swallow it and cut
                    self.cuts += 1
                    self._shut(client, server)
                    self.on_cut()
                    return
                client.sendall(chunk)
        except OSError:
            pass
        finally:
            self._shut(client, server)


class PrivatePrefectServer:
    """A `prefect server start` of its own (its own PREFECT_HOME and SQLite database in a temporary
    folder, a free loopback port), for tests that stop or restart the Prefect API: never the
    session's shared test server. `restart()` keeps the port and the database, as a real restart
    does. Only the API: no UI, no background services (nothing here needs them, and they slow a
    start on a loaded machine)."""

    def __init__(self, port: int | None = None, start_timeout_s: float = 90):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.start_timeout_s = start_timeout_s
        self.root = Path(tempfile.mkdtemp(prefix="mlops-private-prefect-"))
        self.log = self.root / "server.log"
        self.process: subprocess.Popen | None = None
        self.starts = 0

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(PREFECT_HOME=str(self.root / "home"),
                   PREFECT_PROFILES_PATH=str(self.root / "home" / "profiles.toml"),
                   PREFECT_SERVER_DATABASE_CONNECTION_URL=(
                       f"sqlite+aiosqlite:///{self.root / 'prefect.db'}"),
                   PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_SERVER_UI_ENABLED="false",
                   PREFECT_LOGGING_LEVEL="WARNING")
        return env

    def start(self) -> "PrivatePrefectServer":
        if self.process is not None and self.process.poll() is None:
            return self
        with open(self.log, "a") as log:
            log.write(f"--- start {self.starts + 1}\n")
            log.flush()
            self.process = subprocess.Popen(
                [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                 "--port", str(self.port), "--no-services", "--no-ui"],
                env=self._env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.starts += 1

        def healthy() -> bool:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as answer:
                return answer.status == 200

        wait_until_answers(self.process, healthy, self.start_timeout_s, self.log,
                           f"the private Prefect server on port {self.port} (/api/health)",
                           every_s=0.3)
        return self

    def stop(self) -> None:
        """SIGTERM to the server's process group (SIGKILL after 20 s); the port is free after."""
        if self.process is not None:
            stop_process_group(self.process)

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
