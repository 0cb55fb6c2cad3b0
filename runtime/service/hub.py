"""Events for pages: a bounded replay ring of finals with ids, the open partials, and
subscribers with bounded queues.

The hub is a sink of the loop's `SinkSet`, so it runs on the sink thread, never the audio loop,
and it never waits: a subscriber whose queue is full is dropped (its page reconnects and
replays what it missed from the ring). Ids are `EPOCH-SEQ`; the epoch changes when the service
restarts, so a page can tell that the captions before the restart are gone.
"""

from __future__ import annotations

import collections
import json
import os
import queue
import threading
import time
from dataclasses import dataclass

from edgestream.runtime.events.types import Event, Final, Notice, Partial, Stats, to_json

REPLAYED = ("final", "notice", "reply_end")  # what a reconnecting page gets again
CLIENT_QUEUE = 256


@dataclass(frozen=True)
class Message:
    """One server-sent event: `seq` > 0 when it is in the replay ring (then it has an id)."""

    seq: int
    kind: str
    data: str


class Subscriber:
    def __init__(self) -> None:
        self.queue: queue.Queue[Message | None] = queue.Queue(maxsize=CLIENT_QUEUE)
        self.dropped = False

    def put(self, message: Message) -> bool:
        try:
            self.queue.put_nowait(message)
            return True
        except queue.Full:
            self.dropped = True
            return False


class EventHub:
    def __init__(self, history: int = 200, max_clients: int = 16) -> None:
        self.epoch = f"{int(time.time()):x}{os.getpid() & 0xffff:04x}"
        self.max_clients = max_clients
        self._ring: collections.deque[Message] = collections.deque(maxlen=history)
        self._partials: dict[int, Message] = {}  # open lines: their latest partial
        self._subscribers: set[Subscriber] = set()
        self._lock = threading.Lock()
        self._seq = 0
        self.published = 0
        self.dropped_clients = 0
        self.refused_clients = 0

    # -- the sink side ---------------------------------------------------------------------

    def emit(self, event: Event) -> None:
        if isinstance(event, Stats):
            return  # /metrics has them; pages do not need a stats stream
        kind = event.type
        data = to_json(event)
        with self._lock:
            if kind in REPLAYED:
                self._seq += 1
                message = Message(self._seq, kind, data)
                self._ring.append(message)
            else:
                message = Message(0, kind, data)
            if isinstance(event, Partial):
                self._partials[event.line] = message
            elif isinstance(event, Final):
                self._partials.pop(event.line, None)
            elif isinstance(event, Notice) and event.kind == "mic_lost":
                self._partials.clear()
            self.published += 1
            slow = [s for s in self._subscribers if not s.put(message)]
            for s in slow:
                self._drop(s)

    def _drop(self, subscriber: Subscriber) -> None:
        self._subscribers.discard(subscriber)
        self.dropped_clients += 1
        try:  # wake its writer so it closes the connection
            subscriber.queue.get_nowait()
            subscriber.queue.put_nowait(None)
        except (queue.Empty, queue.Full):
            pass

    # -- the page side -------------------------------------------------------------------------

    def subscribe(self, last_event_id: str) -> tuple[Subscriber, dict[str, object],
                                                     list[Message]] | None:
        """A new page connection: its queue, a hello, and what it must see first (the finals
        after `last_event_id` "EPOCH-SEQ", or all of this epoch for "EPOCH-" or "", then the
        open partials). None when full."""
        epoch, _, seq = last_event_id.partition("-")
        with self._lock:
            if len(self._subscribers) >= self.max_clients:
                self.refused_clients += 1
                return None
            subscriber = Subscriber()
            self._subscribers.add(subscriber)
            same = epoch == self.epoch  # "EPOCH-" (no seq): a reloaded page, replay all
            after = int(seq) if same and seq.isdigit() else 0
            oldest = self._ring[0].seq if self._ring else self._seq + 1
            backlog = [m for m in self._ring if m.seq > after]
            backlog += list(self._partials.values())
            hello = {"type": "hello", "epoch": self.epoch,
                     "restarted": bool(epoch) and not same,
                     # finals the page missed that the ring no longer holds
                     "lost": max(0, oldest - after - 1) if after else 0,
                     "ring": len(self._ring), "after": after}
        return subscriber, hello, backlog

    def unsubscribe(self, subscriber: Subscriber) -> None:
        with self._lock:
            self._subscribers.discard(subscriber)

    def event_id(self, message: Message) -> str:
        return f"{self.epoch}-{message.seq}"

    @property
    def clients(self) -> int:
        return len(self._subscribers)

    def close(self) -> None:
        """Ask every connection to end (service shutdown)."""
        with self._lock:
            for s in list(self._subscribers):
                try:
                    s.queue.put_nowait(None)
                except queue.Full:
                    pass
            self._subscribers.clear()


def hello_json(hello: dict[str, object]) -> str:
    return json.dumps(hello)
