"""Helpers for tests that run real servers as subprocesses (MLflow, moto's S3 server, …)."""
from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path


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


class WatchingProxy:
    """A TCP proxy on loopback in front of a test server: it passes bytes through unchanged and
    calls `on_request(request_line)` before forwarding each HTTP request it sees from a client, so
    a test can stop the server (by its PID) at an exact point of a client's conversation -- e.g.
    right before the request that creates a model version. The fault itself stays real: the
    server process is stopped or killed, and the client sees what it would see."""

    METHODS = (b"GET ", b"POST ", b"PUT ", b"PATCH ", b"DELETE ", b"HEAD ")

    def __init__(self, target_port: int, on_request=None):
        import socket
        import threading

        self.target_port = target_port
        self.on_request = on_request or (lambda line: None)
        self.seen: list[str] = []
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket
        import threading

        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()  # the server is down: the client sees the connection drop
                continue
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, source, sink, from_client: bool) -> None:
        import socket

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
            # shutdown, not only close: a close does not wake the other direction's thread
            # blocked in recv, and the peer would never see the connection end
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def close(self) -> None:
        self._closed = True
        self._listener.close()
