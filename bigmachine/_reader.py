"""The reader of a connection: a thread that turns bytes off the socket into frame events.

It blocks in ``recv_into`` (or the TLS channel's ``read_into``) straight into
the buffer the decoder hands out, so bulk data lands in its final place, and
passes each decoded event to the connection on this thread. Loop wake-ups
that one read causes are sent together when its events are handled. It never
waits on an event loop, so a reply reaches its caller with one thread wake-up.
"""
from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from typing import Any, Callable

from ._waiters import begin_batch, end_batch
from ._wire import Decoder, WireError
from .errors import ProtocolError

log = logging.getLogger("bigmachine.connection")


class Reader:
    """Reads frames off sock on a daemon thread until the connection closes.

    on_event(event) handles one decoded frame event; is_closed() tells it to
    stop; fail(error) and io_failed(what, exc) close the connection.
    """

    def __init__(self, sock: socket.socket, tls: Any, decoder: Decoder, peer: str,
                 on_event: Callable[[tuple], None], is_closed: Callable[[], bool],
                 fail: Callable[[BaseException], None],
                 io_failed: Callable[[str, BaseException], BaseException],
                 on_tls_output: Callable[[bytes], None]):
        self.sock = sock
        self.tls = tls
        self.decoder = decoder
        self.peer = peer
        self.on_event = on_event
        self.is_closed = is_closed
        self.fail = fail
        self.io_failed = io_failed
        self.on_tls_output = on_tls_output
        self.last_recv = time.monotonic()
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"bigmachine-read-{peer}")

    def start(self) -> None:
        self.thread.start()

    def is_alive(self) -> bool:
        return self.thread.is_alive()

    def _run(self) -> None:
        try:
            self._read_loop()
        except WireError as exc:
            log.warning("closing connection to %s: malformed frame: %s", self.peer, exc)
            err = ProtocolError(f"malformed frame from {self.peer}: {exc}")
            err.__cause__ = exc
            self.fail(err)
        except (OSError, ssl.SSLError) as exc:
            self.io_failed("read", exc)
        except BaseException as exc:
            # A reader must never die leaving a connection that looks open.
            log.exception("closing connection to %s: its reader failed", self.peer)
            self.io_failed("reader", exc)

    def _read_loop(self) -> None:
        decoder, sock, tls, on_event = self.decoder, self.sock, self.tls, self.on_event
        while True:
            if tls is None:
                n = sock.recv_into(decoder.get_buffer())
            else:
                n = tls.read_into(sock, decoder.get_buffer())
                if tls.outgoing.pending:
                    self.on_tls_output(tls.pending_output())
            if n == 0:
                self.io_failed("read", EOFError("connection closed by peer"))
                return
            self.last_recv = time.monotonic()
            pending = begin_batch()
            try:
                for event in decoder.buffer_updated(n):
                    on_event(event)
                event = None  # do not hold the last message while waiting for the next
            finally:
                end_batch(pending)
            if self.is_closed():
                return
