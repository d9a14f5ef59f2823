"""Running the service with uvicorn (`python -m api`), one process or several workers."""
from __future__ import annotations

import socket

import uvicorn


class TcpConfig(uvicorn.Config):
    """uvicorn's Config, with a listening socket that says it is TCP.

    With several workers, uvicorn binds `socket.socket(AF_INET)` itself, whose protocol number
    is 0; asyncio sets TCP_NODELAY only on sockets whose protocol is IPPROTO_TCP, so every
    connection of the workers kept Nagle's algorithm on, and a response written in two parts
    (head, body) waited for the client's delayed ACK, about 40 ms (measured here: a bare route
    at 170 req/s with 2 workers against 2,000 with one). The same socket declared TCP gets
    TCP_NODELAY on each accepted connection.
    """

    def bind_socket(self) -> socket.socket:
        sock = super().bind_socket()
        if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.proto == 0:
            sock = socket.socket(sock.family, sock.type, socket.IPPROTO_TCP, fileno=sock.detach())
            sock.set_inheritable(True)
        return sock

    def load(self) -> None:
        super().load()
        self.http_protocol_class = _coalescing(self.http_protocol_class)


class CoalescingTransport:
    """A connection's transport that sends a response head together with the body that follows.

    uvicorn writes the head of a response when the app sends `http.response.start` and the body
    at `http.response.body`: two send() calls and, with TCP_NODELAY, two segments per answer,
    each paid with the GIL held (uvloop's write: a third of a prediction worker's time under
    load, py-spy --gil) and each waking the client. Here a head that announces a
    `content-length` is held back and written with the next write (the body uvicorn writes next),
    or when the response is complete without one (HEAD) or the connection closes; a head without
    it (a streamed answer, an interim 100 Continue) goes out at once. Everything else is the
    wrapped transport's."""

    __slots__ = ("_transport", "_held", "is_closing", "pause_reading", "resume_reading",
                 "get_extra_info")

    def __init__(self, transport) -> None:
        self._transport, self._held = transport, None
        # bound once: uvicorn calls these on every request (no __getattr__ detour)
        self.is_closing, self.get_extra_info = transport.is_closing, transport.get_extra_info
        self.pause_reading, self.resume_reading = transport.pause_reading, transport.resume_reading

    def write(self, data) -> None:
        held = self._held
        if held is not None:
            self._held = None
            self._transport.write(held + data)
        elif (data[:5] == b"HTTP/" and data[-4:] == b"\r\n\r\n"
              and b"\r\ncontent-length:" in data.lower()):
            self._held = bytes(data)
        else:
            self._transport.write(data)

    def flush(self) -> None:
        """Write a held head now (a response complete without a body write: HEAD)."""
        held, self._held = self._held, None
        if held is not None and not self._transport.is_closing():
            self._transport.write(held)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name):
        return getattr(self._transport, name)


def _coalescing(protocol_class: type) -> type:
    class Coalescing(protocol_class):
        def connection_made(self, transport, *args) -> None:
            super().connection_made(CoalescingTransport(transport), *args)

        def on_response_complete(self) -> None:
            self.transport.flush()
            super().on_response_complete()

    Coalescing.__name__ = Coalescing.__qualname__ = f"Coalescing{protocol_class.__name__}"
    return Coalescing


def serve(app: str, *, workers: int = 1, factory: bool = False, **options) -> None:
    """`uvicorn.run` with TcpConfig (the same steps: several workers share one socket)."""
    config = TcpConfig(app, factory=factory, workers=workers, **options)
    server = uvicorn.Server(config)
    if config.workers > 1:
        from uvicorn.supervisors import Multiprocess

        Multiprocess(config, sockets=[config.bind_socket()]).run()
        return
    server.run()
    if not server.started:
        raise SystemExit(3)
