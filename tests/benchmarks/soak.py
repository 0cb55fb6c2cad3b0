"""F. Soak: the whole service path for at least 30 minutes of audio, with a page connected.

Run: `.venv/bin/python tests/benchmarks/soak.py [--minutes 30] [--speed 2]`

`edgestream service` (a child process, as systemd runs it, with a real NOTIFY_SOCKET) streams a
WAV made of the project's real clips, each followed by 6-14 s of silence (a kiosk hears more
silence than speech), at `--speed` times real time through the live path (FileSource paced by
a clock, backlog, gaps, the kiosk server). Connected to its server for the whole run: headless
Chromium on the kiosk page, and an SSE reader that checks the event ids. Reported:
- resident memory (VmRSS of the service) after warm-up and at the end, growth in % (target < 2);
- events lost: finals in the service's JSON-lines file vs finals received by the SSE reader
  (ids must be contiguous), and finals on the page vs the last of them (the page keeps 60);
- the stats (RTF, step percentiles, end of speech to final, gaps, drops) and WER per clip pass.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "service"))

import streaming as S  # noqa: E402
from service_helpers import NotifySocket  # noqa: E402


def vm_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def build_audio(minutes: float, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    refs = S.refs()
    names = list(refs)
    clips = {n: S.read_clip(n) for n in names}
    pieces, order, total = [], [], 0
    i = 0
    while total < minutes * 60 * S.RATE:
        name = names[i % len(names)]
        silence = np.zeros(int(rng.uniform(6, 14) * S.RATE), np.float32)
        pieces += [clips[name], silence]
        order.append(name)
        total += clips[name].size + silence.size
        i += 1
    return np.concatenate(pieces), order


class SseCounter:
    def __init__(self, url: str) -> None:
        self.ids: list[int] = []  # every event with an id (finals and notices)
        self.finals = 0
        self.hellos = 0
        self.url = url
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        with urllib.request.urlopen(self.url + "events", timeout=60) as r:
            event_id, kind = "", "message"
            for raw in r:
                line = raw.decode().rstrip("\n")
                if line.startswith("id: "):
                    event_id = line[4:]
                elif line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: "):
                    data = json.loads(line[6:])
                    if kind == "hello":
                        self.hellos += 1
                    elif event_id:
                        self.ids.append(int(event_id.split("-")[1]))
                        self.finals += data["type"] == "final"
                elif line == "":
                    event_id, kind = "", "message"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--speed", type=float, default=2.0)
    ap.add_argument("--backlog-s", type=float, default=12.0,
                    help="audio the live source keeps (at --speed x, this much / speed of wall)")
    ap.add_argument("--bundle", type=Path, default=Path.home() / ".cache/edgestream/whisper-tiny.en")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    bundle = S.whisper_bundle(args.bundle)
    work = Path(tempfile.mkdtemp(prefix="edgestream-soak-"))
    audio, order = build_audio(args.minutes)
    wav = work / "soak.wav"
    S.write_wav(wav, audio)
    events_file = work / "events.jsonl"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (work / "config.toml").write_text(
        f'bundle = "{bundle}"\ninput = "{wav}"\ninput_speed = {args.speed}\n'
        f'threads = {args.threads}\nstats_every_s = 300.0\nbacklog_s = {args.backlog_s}\n'
        f'[server]\naddress = "127.0.0.1:{port}"\nhistory = 500\n'
        f'[sinks]\njsonl = "{events_file}"\n')
    notify = NotifySocket(work / "notify.sock")
    exe = Path(sys.executable).with_name("edgestream")
    proc = subprocess.Popen([str(exe), "service", "--config", str(work / "config.toml")],
                            env={**os.environ, "NOTIFY_SOCKET": str(notify.path),
                                 "WATCHDOG_USEC": "30000000"},
                            stderr=open(work / "service.log", "w"))
    t0 = time.monotonic()
    notify.wait_for("READY", 300)
    ready_s = time.monotonic() - t0
    url = f"http://127.0.0.1:{port}/"
    sse = SseCounter(url)
    driver = None
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service as DriverService

        options = webdriver.ChromeOptions()
        options.binary_location = "/usr/bin/chromium"
        for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                     "--no-first-run", "--disable-background-networking", "--kiosk",
                     "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"):
            options.add_argument(flag)
        driver = webdriver.Chrome(service=DriverService("/usr/bin/chromedriver"), options=options)
        driver.get(url)
    except Exception as e:  # the SSE reader still counts; say the page was missing
        print(f"page not connected: {e}")
    time.sleep(30 / args.speed * 3)  # warm-up: the first pass of the allocator settles
    rss_warm = vm_rss(proc.pid)
    samples = [(time.monotonic() - t0, rss_warm)]
    wall = audio.size / S.RATE / args.speed
    while time.monotonic() - t0 < ready_s + wall + 5:
        time.sleep(15)
        samples.append((time.monotonic() - t0, vm_rss(proc.pid)))
        if proc.poll() is not None:
            break
    rss_end = vm_rss(proc.pid)
    page_lines = []
    if driver is not None:
        page_lines = driver.execute_script(
            "return [...document.querySelectorAll('.line.final')].map(e => e.textContent)")
    proc.terminate()
    code = proc.wait(30)
    notify.close()
    if driver is not None:
        driver.quit()
    events = [json.loads(line) for line in events_file.read_text().splitlines()]
    finals = [e for e in events if e["type"] == "final"]
    stats = [e for e in events if e["type"] == "stats"]
    pings = np.diff(notify.times("WATCHDOG"))
    nonempty = [f["text"] for f in finals if f["text"]]
    ref_text = " ".join(S.refs()[n] for n in order)
    hyp = " ".join(nonempty)
    print(f"soak: {audio.size / S.RATE / 60:.1f} min of audio ({len(order)} clips) at "
          f"{args.speed}x, {args.threads} threads, load {S.load_avg()}")
    print(f"  ready in {ready_s:.1f} s; exit code after SIGTERM {code}")
    print(f"  RSS after warm-up {rss_warm / 2**20:.1f} MiB, at the end {rss_end / 2**20:.1f} MiB,"
          f" growth {100 * (rss_end - rss_warm) / rss_warm:+.2f} %, max "
          f"{max(r for _, r in samples) / 2**20:.1f} MiB over {len(samples)} samples")
    ids = sse.ids
    print(f"  finals written {len(finals)}, received by the SSE reader {sse.finals} (event ids "
          f"contiguous {ids == list(range(1, len(ids) + 1))}, hellos {sse.hellos}), on the page "
          f"{len(page_lines)} (last 60 kept; match the last written: "
          f"{[t.strip() for t in page_lines] == nonempty[-len(page_lines):] if page_lines else False})")
    print(f"  WER over the whole run {100 * S.wer(ref_text, hyp):.1f} %")
    print(f"  watchdog pings {len(pings) + 1}, max interval {pings.max():.1f} s (limit 30 s)")
    last = stats[-1] if stats else {}
    print("  final stats: " + json.dumps({k: last.get(k) for k in (
        "audio_s", "rtf", "step_ms_p50", "step_ms_p99", "step_ms_max", "eos_to_final_ms_p50",
        "eos_to_final_ms_max", "gaps", "gap_s", "dropped_blocks", "mic_overruns",
        "speculative_used", "speculative_discarded")}))
    print(f"  work folder {work}")


if __name__ == "__main__":
    main()
