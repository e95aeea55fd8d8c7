"""A real webhook receiver on loopback for the tests: records each post, answers as told."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar


class Receiver(BaseHTTPRequestHandler):
    """Records each post (lower-cased headers, body, arrival time), waits ``hold_seconds``,
    then answers the next code queued in ``answers``, or ``default_status``, with a body of
    ``body_bytes`` (the bytes it got out before the sender hung up go in ``sent``)."""

    got: ClassVar[list[tuple[dict[str, str], bytes]]] = []
    arrived: ClassVar[list[float]] = []  # time.monotonic() of each post
    answers: ClassVar[list[int]] = []
    default_status: ClassVar[int] = 200
    hold_seconds: ClassVar[float] = 0.0
    body_bytes: ClassVar[int] = 0
    sent: ClassVar[list[int]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Receiver.got.append(({k.lower(): v for k, v in self.headers.items()}, body))
        Receiver.arrived.append(time.monotonic())
        time.sleep(Receiver.hold_seconds)
        self.send_response(Receiver.answers.pop(0) if Receiver.answers else self.default_status)
        if Receiver.body_bytes:
            self.send_header("Content-Length", str(Receiver.body_bytes))
        self.end_headers()
        sent, chunk = 0, b"x" * 65536
        try:
            while piece := chunk[: Receiver.body_bytes - sent]:
                self.wfile.write(piece)
                sent += len(piece)
        except OSError:
            pass  # the sender hung up
        Receiver.sent.append(sent)

    def log_message(self, *_: Any) -> None:
        pass


@contextmanager
def receiving(
    *,
    default_status: int = 200,
    hold_seconds: float = 0.0,
    body_bytes: int = 0,
    tls: ssl.SSLContext | None = None,
) -> Iterator[str]:
    """A receiver with empty records until the block ends (over TLS with ``tls``, a server
    context); yields its URL."""
    Receiver.got, Receiver.arrived, Receiver.answers, Receiver.sent = [], [], [], []
    Receiver.default_status, Receiver.hold_seconds = default_status, hold_seconds
    Receiver.body_bytes = body_bytes
    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    scheme = "https" if tls is not None else "http"
    try:
        yield f"{scheme}://127.0.0.1:{server.server_address[1]}/hook"
    finally:
        server.shutdown()


@contextmanager
def trickling(byte_every: float = 0.2) -> Iterator[str]:
    """A receiver that reads a post, then answers one byte every ``byte_every`` seconds (a
    200 in the end, some minutes later); yields its URL."""
    listener = socket.create_server(("127.0.0.1", 0))
    answer = b"HTTP/1.1 200 OK\r\n" + b"".join(b"x-pad: %d\r\n" % i for i in range(200)) + b"\r\n"

    def serve(conn: socket.socket) -> None:
        with conn:
            conn.recv(65536)
            try:
                for i in range(len(answer)):
                    conn.sendall(answer[i : i + 1])
                    time.sleep(byte_every)
            except OSError:
                pass  # the sender hung up

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # closed: the block ended
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/hook"
    finally:
        listener.close()
