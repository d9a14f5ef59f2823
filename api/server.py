"""Running the service with uvicorn (`python -m api`), one process or several workers."""
from __future__ import annotations

import asyncio
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
    load, py-spy --gil) and each waking the client. Here a head is held back and written with
    the next write, which for every response comes in the same loop step; a head alone (an
    interim 100 Continue, a streamed body that comes later) goes out at the next loop turn.
    Everything else is the wrapped transport's."""

    __slots__ = ("_transport", "_loop", "_held")

    def __init__(self, transport, loop) -> None:
        self._transport, self._loop, self._held = transport, loop, None

    def write(self, data) -> None:
        held = self._held
        if held is not None:
            self._held = None
            self._transport.write(held + data)
        elif data[:5] == b"HTTP/" and data[-4:] == b"\r\n\r\n":
            self._held = bytes(data)
            self._loop.call_soon(self._release)
        else:
            self._transport.write(data)

    def _release(self) -> None:
        held, self._held = self._held, None
        if held is not None and not self._transport.is_closing():
            self._transport.write(held)

    def close(self) -> None:
        self._release()
        self._transport.close()

    def __getattr__(self, name):
        return getattr(self._transport, name)


def _coalescing(protocol_class: type) -> type:
    class Coalescing(protocol_class):
        def connection_made(self, transport, *args) -> None:
            loop = asyncio.get_running_loop()
            super().connection_made(CoalescingTransport(transport, loop), *args)

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
