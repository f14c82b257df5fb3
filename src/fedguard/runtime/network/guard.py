"""Bounds on what one peer can hold on the server: deadlines, idle eviction, concurrent calls.

A gRPC handler thread that waits for a frame is held by the peer that does not send it; with
enough idle calls every thread of the pool is held and nobody can join (issue 14: 48 idle
Submit streams from one revoked client blocked every Join for 70 s). :class:`CallGuard` gives
each call a deadline (the first frame within ``first_frame_s``, then at most ``idle_s``
between frames and ``call_s`` in all) and a watchdog thread cancels the calls past theirs,
which frees their threads. It also caps the calls one client identity holds at once
(``per_client``) and the calls that have not authenticated yet (``unauthenticated``); a call
over a cap is refused at once with RESOURCE_EXHAUSTED instead of queueing.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any


class Busy(Exception):
    """A call over one of the caps; the text says which."""


@dataclass
class Ticket:
    """One call in flight."""

    token: int
    context: Any
    what: str
    identity: str | None
    deadline: float
    started: float = field(default_factory=time.monotonic)
    #: no deadline beyond this (the call's whole allowance)
    limit: float = float("inf")
    #: why the watchdog cancelled this call (None while it runs)
    expired: str | None = None
    reason_next: str = "no first frame"


class CallGuard:
    """Deadlines and caps for the server's calls; one watchdog thread cancels late calls."""

    def __init__(
        self,
        first_frame_s: float,
        idle_s: float,
        call_s: float,
        per_client: int,
        unauthenticated: int,
        on_expired: Callable[[Ticket], None] | None = None,
        tick_s: float = 0.2,
        on_tick: Callable[[], None] | None = None,
    ) -> None:
        self.first_frame_s, self.idle_s, self.call_s = first_frame_s, idle_s, call_s
        self.per_client, self.unauthenticated = per_client, unauthenticated
        self.on_expired, self.on_tick, self.tick_s = on_expired, on_tick, tick_s
        self._lock = threading.Lock()
        self._calls: dict[int, Ticket] = {}
        self._tokens = itertools.count()
        self._stop = threading.Event()
        self.evicted = 0
        self._thread = threading.Thread(target=self._watch, name="fedguard-call-guard", daemon=True)
        self._thread.start()

    # -- admission ------------------------------------------------------------------------
    def enter(self, context: Any, what: str, identity: str | None, deadline_s: float | None = None,
              call_s: float | None = None) -> Ticket:
        """Admit a call (``identity``: the client it is known to be, None before authentication);
        its first deadline is ``deadline_s`` away (``first_frame_s``), its last ``call_s``."""
        with self._lock:
            self._admit(identity)
            now = time.monotonic()
            ticket = Ticket(next(self._tokens), context, what, identity,
                            now + (self.first_frame_s if deadline_s is None else deadline_s), now)
            ticket.limit = now + (self.call_s if call_s is None else call_s)
            self._calls[ticket.token] = ticket
        return ticket

    def _admit(self, identity: str | None, exclude: int | None = None) -> None:
        held = sum(1 for t in self._calls.values() if t.identity == identity and t.token != exclude)
        if identity is None and held >= self.unauthenticated:
            raise Busy(f"{held} unauthenticated calls are open on this server (network.max_unauthenticated_calls)")
        if identity is not None and held >= self.per_client:
            raise Busy(f"{identity} already holds {held} calls (network.max_calls_per_client)")

    def authenticated(self, ticket: Ticket, identity: str) -> None:
        """The call turned out to come from ``identity``: count it there (Busy over that cap)."""
        with self._lock:
            if ticket.identity == identity:
                return
            self._admit(identity, exclude=ticket.token)
            ticket.identity = identity

    def extend(self, ticket: Ticket, seconds: float | None = None, reason: str = "no frame") -> None:
        """The call made progress: its next deadline is ``seconds`` away (``idle_s``), within ``call_s``."""
        with self._lock:
            ticket.deadline = min(ticket.limit, time.monotonic() + (self.idle_s if seconds is None else seconds))
            ticket.reason_next = reason if ticket.deadline < ticket.limit else "call took longer than allowed"

    def leave(self, ticket: Ticket) -> None:
        """The call ended."""
        with self._lock:
            self._calls.pop(ticket.token, None)

    def held(self, identity: str | None) -> int:
        """Calls ``identity`` holds now."""
        with self._lock:
            return sum(1 for t in self._calls.values() if t.identity == identity)

    def frames(self, ticket: Ticket, frames: Iterator[bytes]) -> Iterator[bytes]:
        """``frames`` with the deadline moved on after each one (the first was waited for with
        ``first_frame_s``)."""
        for frame in frames:
            self.extend(ticket, reason=f"no frame for {self.idle_s:g} s (idle stream evicted)")
            yield frame

    # -- the watchdog ---------------------------------------------------------------------
    def _watch(self) -> None:
        while not self._stop.wait(self.tick_s):
            now = time.monotonic()
            with self._lock:
                late = [t for t in self._calls.values() if t.expired is None and t.deadline <= now]
                for ticket in late:
                    ticket.expired = ticket.reason_next
            for ticket in late:
                self.evicted += 1
                if self.on_expired is not None:  # counted before the peer can see the cancellation
                    self.on_expired(ticket)
                try:
                    ticket.context.cancel()
                except Exception:  # noqa: BLE001 - the call may have ended meanwhile
                    pass
            if self.on_tick is not None:
                self.on_tick()

    def close(self) -> None:
        """Stop the watchdog."""
        self._stop.set()
        self._thread.join(timeout=2.0)

