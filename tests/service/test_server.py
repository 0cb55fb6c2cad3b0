"""The kiosk server over real sockets: SSE replay with ids and epochs, bounded clients, garbage,
/healthz and /metrics (parsed by the Prometheus client library's own parser)."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from edgestream.runtime.events.sinks import SinkSet
from edgestream.runtime.events.types import Final, Notice, Partial, SpeechStarted
from edgestream.runtime.loop import LoopStatus
from edgestream.runtime.service.main import Kiosk


@pytest.fixture
def kiosk():  # type: ignore[no-untyped-def]
    k = Kiosk.bind("127.0.0.1:0", history=5, max_clients=3, status=LoopStatus())
    sinks = SinkSet([k.hub])
    k.start(sinks)
    yield k, sinks
    sinks.close()
    k.stop()


class SseClient:
    """Reads a real event stream; `events` are (id, data dict or hello) as they arrive."""

    def __init__(self, url: str, last_id: str = "") -> None:
        host, port = url.split("//")[1].rstrip("/").split(":")
        self.conn = http.client.HTTPConnection(host, int(port), timeout=10)
        headers = {"Last-Event-ID": last_id} if last_id else {}
        self.conn.request("GET", "/events", headers=headers)
        self.response = self.conn.getresponse()
        self.events: list[tuple[str, dict]] = []
        self.closed = False
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        event_id, data, kind = "", "", "message"
        try:
            for raw in self.response:
                line = raw.decode().rstrip("\n")
                if line.startswith("id: "):
                    event_id = line[4:]
                elif line.startswith("data: "):
                    data = line[6:]
                elif line.startswith("event: "):
                    kind = line[7:]
                elif line == "" and data:
                    payload = json.loads(data)
                    self.events.append((event_id if kind == "message" else "", payload))
                    event_id, data, kind = "", "", "message"
        except (OSError, ValueError):
            pass
        self.closed = True

    def wait(self, n: int, timeout: float = 5.0) -> list[tuple[str, dict]]:
        end = time.monotonic() + timeout
        while len(self.events) < n and time.monotonic() < end:
            time.sleep(0.02)
        return self.events

    def close(self) -> None:
        self.conn.close()


def finals(n: int, start: int = 0) -> list[Final]:
    return [Final(i, float(i), f"line {i}", "endpoint", float(i), i + 0.5)
            for i in range(start, start + n)]


def test_live_events_then_replay_after_reconnect(kiosk) -> None:  # type: ignore[no-untyped-def]
    k, sinks = kiosk
    page = SseClient(k.url)
    assert page.wait(1)[0][1]["type"] == "hello"
    sinks.emit([SpeechStarted(0, 0.1, 0.0), Partial(0, 0.5, "line", ""), *finals(2)])
    got = page.wait(5)
    assert [e["type"] for _, e in got] == ["hello", "speech_started", "partial", "final", "final"]
    last_id = got[-1][0]
    assert last_id.startswith(k.hub.epoch + "-") and got[2][0] == ""  # partials carry no id
    page.close()
    # the page is away while two more lines are finalized and a third is being spoken
    sinks.emit([*finals(2, start=2), Partial(4, 4.2, "line four so", "line")])
    time.sleep(0.2)
    back = SseClient(k.url, last_id)
    got = back.wait(4)
    hello = got[0][1]
    assert hello["restarted"] is False and hello["lost"] == 0
    assert [e["text"] for _, e in got[1:]] == ["line 2", "line 3", "line four so"]
    back.close()


def test_ring_overflow_and_new_epoch_are_reported(kiosk) -> None:  # type: ignore[no-untyped-def]
    k, sinks = kiosk
    page = SseClient(k.url)
    sinks.emit(finals(1))
    first_id = page.wait(2)[1][0]
    page.close()
    sinks.emit(finals(8, start=1))  # the ring holds 5: lines 1-3 are gone
    time.sleep(0.2)
    back = SseClient(k.url, first_id)
    got = back.wait(6)
    assert got[0][1]["lost"] == 3 and [e["line"] for _, e in got[1:]] == [4, 5, 6, 7, 8]
    back.close()
    other = SseClient(k.url, "0123abcd-17")  # an id from before a service restart
    got = other.wait(6)
    assert got[0][1]["restarted"] is True and len(got) == 6  # hello + the whole ring
    other.close()


def test_clients_are_bounded_and_garbage_is_refused(kiosk) -> None:  # type: ignore[no-untyped-def]
    k, sinks = kiosk
    pages = [SseClient(k.url) for _ in range(3)]
    for p in pages:
        p.wait(1)
    extra = http.client.HTTPConnection(*k.server.server_address[:2], timeout=5)
    extra.request("GET", "/events")
    assert extra.getresponse().status == 503  # max_clients reached
    # garbage on the wire: a 400 and a closed connection
    with socket.create_connection(k.server.server_address[:2], timeout=5) as s:
        s.sendall(b"\x16\x03\x01\x02\x00garbage\r\n\r\n")
        reply = b""
        while chunk := s.recv(4096):  # the server closes the connection after its answer
            reply += chunk
        assert b"Error code: 400" in reply, reply
    # hundreds of connections that send nothing: refused past the bound, none stalls the hub
    idle = []
    for _ in range(300):
        try:
            idle.append(socket.create_connection(k.server.server_address[:2], timeout=5))
        except OSError:
            break
    started = time.perf_counter()
    sinks.emit(finals(1))
    for p in pages:
        assert p.wait(2)[-1][1]["type"] == "final"
    assert time.perf_counter() - started < 2.0
    assert k.server.refused > 200
    for s in idle:
        s.close()
    for p in pages:
        p.close()


def test_a_page_that_stops_reading_is_dropped_not_waited_for(kiosk) -> None:  # type: ignore[no-untyped-def]
    k, sinks = kiosk
    host, port = k.server.server_address[:2]
    stuck = socket.create_connection((host, port))
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.sendall(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")  # and never reads
    time.sleep(0.3)
    emit_s = []
    for _ in range(40):  # 40 x 200 partials of 20 kB: far more than socket buffers hold
        started = time.perf_counter()
        sinks.emit([Partial(0, 0.0, "x" * 20000, "")] * 200)
        emit_s.append(time.perf_counter() - started)
        time.sleep(0.05)
    deadline = time.monotonic() + 15
    while k.hub.clients and time.monotonic() < deadline:
        time.sleep(0.1)
    # its queue filled while its socket was full: the hub dropped it, and never waited
    assert k.hub.dropped_clients == 1 and k.hub.clients == 0, k.hub.dropped_clients
    assert max(emit_s) < 0.5, emit_s
    stuck.close()


def test_healthz_and_metrics(kiosk) -> None:  # type: ignore[no-untyped-def]
    from prometheus_client.parser import text_string_to_metric_families

    k, sinks = kiosk
    sinks.emit([Notice(0.0, "mic_lost", "gone")])
    k.status.mic_up = False
    conn = http.client.HTTPConnection(*k.server.server_address[:2], timeout=5)
    conn.request("GET", "/healthz")
    response = conn.getresponse()
    health = json.loads(response.read())
    # no loop runs in this test: not ready, and a load balancer or systemd check sees a 503
    assert response.status == 503 and health["ready"] is False
    assert set(health) >= {"ready", "last_chunk_age_s", "lag_s", "overruns", "mic"}
    assert health["mic"] == "lost"
    text = urllib.request.urlopen(k.url + "metrics").read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["edgestream_mic_up"].samples[0].value == 0
    assert families["edgestream_page_clients"].type == "gauge"


def test_metrics_of_a_real_stream(tiny_bundle: Path) -> None:
    """Histogram buckets and counters as Prometheus reads them, against the stream's own
    counts of chunks and steps."""
    from prometheus_client.parser import text_string_to_metric_families

    from conftest import speech_dir
    from edgestream.runtime.api import load
    from edgestream.runtime.audio.sources import FileSource
    from edgestream.runtime.loop import LoopConfig, run_loop

    status = LoopStatus()
    k = Kiosk.bind("127.0.0.1:0", history=5, max_clients=3, status=status)
    sinks = SinkSet([k.hub])
    k.start(sinks)
    model = load(tiny_bundle, "cpu")
    stream = model.stream()
    assert run_loop(FileSource(speech_dir() / "beckett.wav"), stream, sinks, LoopConfig(),
                    status=status) == 0
    text = urllib.request.urlopen(k.url + "metrics").read().decode()
    sinks.close()
    k.stop()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    chunks = families["edgestream_chunks"].samples[0].value  # the parser strips _total
    assert chunks == stream.stats.chunks > 0
    steps = {s.labels.get("le"): s.value for s in families["edgestream_step_seconds"].samples
             if s.name.endswith("_bucket")}
    assert steps["+Inf"] == chunks and list(steps.values()) == sorted(steps.values())
    import wave

    with wave.open(str(speech_dir() / "beckett.wav")) as w:  # the length, read independently
        seconds = w.getnframes() / w.getframerate()
    audio = families["edgestream_audio_seconds"].samples[0].value
    assert audio == pytest.approx(seconds, abs=0.01)
    rtf = families["edgestream_rtf"].samples[0].value
    assert 0 < rtf < 5
