"""The kiosk's HTTP server: the page at `/`, Server-Sent Events at `/events`, `/healthz` and
`/metrics`.

One thread per connection, and never more than `max_clients` event streams plus a few short
requests at once: a screen that stops reading is dropped when its queue fills, a client that
sends garbage gets a 400 and is closed, one that sends nothing times out. Nothing here can make
the audio loop wait: the hub is fed from the sink thread and only ever `put_nowait`s.
"""

from __future__ import annotations

import json
import logging
import queue
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any, Callable

from edgestream.runtime.service.hub import EventHub, Message

log = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 10.0  # a client must send its request (and read what we write) within this
KEEPALIVE_S = 15.0  # a comment line this often: finds dead connections, keeps proxies open
RETRY_MS = 1000  # what the page's EventSource waits before reconnecting
SHORT_REQUESTS = 8  # page, healthz, metrics at once, besides the event streams


def _page() -> bytes:
    return (resources.files("edgestream.runtime.service") / "kiosk.html").read_bytes()


class KioskServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True  # a restarted service must get its port back at once
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], hub: EventHub,
                 health: Callable[[], dict[str, Any]], metrics: Callable[[], str]) -> None:
        self.hub = hub
        self.health = health
        self.metrics = metrics
        self.page = _page()
        self._slots = threading.BoundedSemaphore(hub.max_clients + SHORT_REQUESTS)
        self.refused = 0
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        # hundreds of connections: past the bound they are closed at once, no thread each
        if not self._slots.acquire(blocking=False):
            self.refused += 1
            try:
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
                                b"Connection: close\r\nRetry-After: 2\r\n\r\n")
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.2},
                                  name="edgestream-kiosk", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self.hub.close()
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: KioskServer
    timeout = REQUEST_TIMEOUT_S
    protocol_version = "HTTP/1.1"
    server_version = "edgestream"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:  # one journal line per request: no
        pass

    def log_error(self, format: str, *args: Any) -> None:
        log.debug("kiosk client %s: " + format, self.client_address[0], *args)

    def _send(self, code: int, body: bytes, content_type: str,
              headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path in ("/", "/index.html"):
            self._send(200, self.server.page, "text/html; charset=utf-8",
                       {"Content-Security-Policy": "default-src 'self'; style-src 'unsafe-inline'"
                        "; script-src 'unsafe-inline'"})
        elif path == "/events":
            self._events()
        elif path == "/healthz":
            health = self.server.health()
            self._send(200 if health["ready"] else 503,
                       (json.dumps(health) + "\n").encode(), "application/json")
        elif path == "/metrics":
            self._send(200, self.server.metrics().encode(),
                       "text/plain; version=0.0.4; charset=utf-8")
        else:
            self._send(404, b"not found\n", "text/plain")

    def do_POST(self) -> None:
        # no endpoint changes state yet; one that does will check server.token first
        self._send(405, b"read-only: no control endpoint\n", "text/plain", {"Allow": "GET, HEAD"})

    do_PUT = do_DELETE = do_PATCH = do_POST

    def _events(self) -> None:
        hub = self.server.hub
        last = self.headers.get("Last-Event-ID", "")
        if not last and "last=" in self.path:  # a page that reloads passes what it had
            last = self.path.split("last=", 1)[1].split("&", 1)[0]
        joined = hub.subscribe(last[:64])
        if joined is None:
            self._send(503, b"too many event streams\n", "text/plain", {"Retry-After": "2"})
            return
        subscriber, hello, backlog = joined
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream; charset=utf-8")
            self.send_header("Cache-Control", "no-store")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            # the hello's id is where this replay starts, so a reconnect before any new final
            # (after a restart, say) resumes in this epoch instead of reporting it again;
            # replaying a final twice is harmless, the page updates the line in place
            self._write(f"retry: {RETRY_MS}\nid: {hub.epoch}-{hello['after']}\nevent: hello\n"
                        f"data: {json.dumps(hello)}\n\n")
            for message in backlog:
                self._write(self._frame(message))
            while True:
                try:
                    message = subscriber.queue.get(timeout=KEEPALIVE_S)
                except queue.Empty:  # nothing said for a while
                    self._write(f": {int(time.time())}\n\n")
                    continue
                if message is None:  # dropped as too slow, or the service stops
                    return
                self._write(self._frame(message))
        except (OSError, socket.timeout):  # the page went away or stopped reading
            return
        finally:
            hub.unsubscribe(subscriber)

    def _frame(self, message: Message) -> str:
        id_line = f"id: {self.server.hub.event_id(message)}\n" if message.seq else ""
        return f"{id_line}data: {message.data}\n\n"

    def _write(self, text: str) -> None:
        self.wfile.write(text.encode("utf-8"))
        self.wfile.flush()


def bind(host: str, port: int, hub: EventHub, health: Callable[[], dict[str, Any]],
         metrics: Callable[[], str]) -> KioskServer:
    """Bind now (a port in use is an error before READY); serve once `start()` is called."""
    from edgestream.runtime.service.config import ConfigError

    try:
        return KioskServer((host, port), hub, health, metrics)
    except OSError as e:
        raise ConfigError(f"server.address: cannot listen on {host}:{port} ({e.strerror}); "
                          "another program (or another edgestream) holds it: pick another port "
                          "with --serve HOST:PORT or stop the other one") from None
