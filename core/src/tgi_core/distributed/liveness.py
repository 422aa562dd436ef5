"""Knowing that every rank is alive, and naming the one that is not.

Every worker rank runs a :class:`Heartbeat`: a daemon thread that bumps the rank's
counter in the store every ``interval`` seconds, and notices when the group is gone
(rank 0 wrote ``abort``, or the store, which lives in rank 0's process, went away).
Rank 0 runs a :class:`Monitor` that, every ``poll`` seconds, reports the first of:

- a rank this machine started that exited (its exit code or signal);
- a rank that wrote why it stopped (``failed/R``);
- a rank that was asked to stop, by SIGTERM or SIGINT (``stop/R``), reported apart:
  the group then shuts down gracefully, as if rank 0 had been asked;
- a rank whose counter did not move for ``timeout`` seconds (hung, or its machine is
  unreachable); only counters are compared, so the machines' clocks don't matter.

Collectives time out on their own (see ``group``); the monitor is what names the rank.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from tgi_core.logging import get_logger

log = get_logger("tgi_core.distributed")


def heartbeat_interval(timeout: float) -> float:
    """How often ranks beat (and rank 0 sends idle plans): a few times per ``timeout``."""
    return min(max(timeout / 6, 0.05), 2.0)


def describe_exit(code: int) -> str:
    """``exit code 3`` or ``killed by SIGKILL``, from a ``Popen.returncode``."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class Heartbeat:
    """A worker's beat: bumps ``beat/<rank>`` in the store every ``interval`` seconds, in
    a daemon thread, and watches for the end of the group.

    :param on_lost: called once, with why, when the group is gone: rank 0 wrote
        ``abort`` (the group failed), the store stopped answering (rank 0's process,
        which hosts it, died), or the process that started this one (``parent_pid``)
        is gone.
    """

    def __init__(
        self,
        store_factory: Callable[[], Any],
        rank: int,
        interval: float,
        *,
        on_lost: Callable[[str], None],
        parent_pid: int | None = None,
    ) -> None:
        self._store_factory, self.rank, self.interval = store_factory, rank, interval
        self._on_lost, self._parent_pid = on_lost, parent_pid
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"tgi-heartbeat-{rank}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        try:
            store = self._store_factory()
            while not self._stop.is_set():
                store.add(f"beat/{self.rank}", 1)
                if store.check(["abort"]):
                    reason = bytes(store.get("abort")).decode(errors="replace")
                    self._lost(f"rank 0 shut the group down: {reason}")
                    return
                if self._parent_pid is not None and os.getppid() != self._parent_pid:
                    self._lost("rank 0's process is gone")
                    return
                self._stop.wait(self.interval)
        except Exception as exc:  # the store went away with rank 0's process
            self._lost(f"the group's store stopped answering: {' '.join(str(exc).split())[:200]}")

    def _lost(self, reason: str) -> None:
        if not self._stop.is_set():
            self._on_lost(reason)


class Monitor:
    """Rank 0's watch over ranks ``1 .. world_size - 1``.

    :param exited: returns ``(rank, returncode)`` of a local rank that exited, or None.
    :param on_failure: called once, from the monitor's thread, with the failed rank and why.
    :param on_stop: called once when a rank was asked to stop.
    """

    def __init__(
        self,
        store_factory: Callable[[], Any],
        world_size: int,
        *,
        timeout: float,
        exited: Callable[[], tuple[int, int] | None],
        on_failure: Callable[[int, str], None],
        on_stop: Callable[[int], None],
        poll: float = 0.1,
    ) -> None:
        self._store_factory, self.world_size, self.timeout = store_factory, world_size, timeout
        self._exited, self._on_failure, self._on_stop = exited, on_failure, on_stop
        self.poll = poll
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tgi-shard-monitor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._halt.set()

    def _run(self) -> None:
        store = self._store_factory()
        ranks = range(1, self.world_size)
        counts = dict.fromkeys(ranks, -1)
        changed = dict.fromkeys(ranks, time.monotonic())
        stop_reported = False
        while not self._halt.wait(self.poll):
            try:
                failure = self._check(store, counts, changed)
                if failure is None and not stop_reported:
                    stopped = next((r for r in ranks if store.check([f"stop/{r}"])), None)
                    if stopped is not None:
                        stop_reported = True
                        self._on_stop(stopped)
            except Exception as exc:  # the store itself failed: nothing can be trusted
                failure = (-1, f"the group's store failed: {' '.join(str(exc).split())[:300]}")
            if failure is not None:
                self._on_failure(*failure)
                return

    def _check(
        self, store: Any, counts: dict[int, int], changed: dict[int, float]
    ) -> tuple[int, str] | None:
        exited = self._exited()
        if exited is not None:
            rank, code = exited
            reason = self._posted(store, rank)
            return rank, reason or f"the process exited ({describe_exit(code)})"
        now = time.monotonic()
        for rank in counts:
            reason = self._posted(store, rank)
            if reason is not None:
                return rank, reason
            count = int(store.add(f"beat/{rank}", 0))
            if count != counts[rank]:
                counts[rank], changed[rank] = count, now
            elif now - changed[rank] > self.timeout:
                return rank, (
                    f"no heartbeat for {now - changed[rank]:.1f} s (shard timeout "
                    f"{self.timeout:g} s): the process is hung or its machine unreachable"
                )
        return None

    @staticmethod
    def _posted(store: Any, rank: int) -> str | None:
        key = f"failed/{rank}"
        if store.check([key]):
            return bytes(store.get(key)).decode(errors="replace")
        return None
