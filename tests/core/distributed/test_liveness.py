"""Rank 0's monitor over a real TCP store: it names the rank that failed, and why."""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from typing import Any

import pytest
from torch.distributed import TCPStore

from tgi_core.distributed.liveness import Heartbeat, Monitor, describe_exit


@pytest.fixture
def store() -> Any:
    # port 0: the server picks a free one
    return TCPStore("127.0.0.1", 0, None, True, timedelta(seconds=5), wait_for_workers=False)


def client(store: Any) -> Any:
    return TCPStore("127.0.0.1", store.port, None, False, timedelta(seconds=5))


class Events:
    def __init__(self) -> None:
        self.failures: list[tuple[int, str]] = []
        self.stops: list[int] = []
        self.seen = threading.Event()

    def failed(self, rank: int, reason: str) -> None:
        self.failures.append((rank, reason))
        self.seen.set()

    def stopped(self, rank: int) -> None:
        self.stops.append(rank)
        self.seen.set()


def monitor(
    store: Any, events: Events, exited: Any = lambda: None, timeout: float = 5.0
) -> Monitor:
    watch = Monitor(
        lambda: client(store),
        3,
        timeout=timeout,
        exited=exited,
        on_failure=events.failed,
        on_stop=events.stopped,
        poll=0.02,
    )
    watch.start()
    return watch


def beat_forever(store: Any, rank: int) -> Heartbeat:
    beat = Heartbeat(lambda: client(store), rank, 0.02, on_lost=lambda reason: None)
    beat.start()
    return beat


def test_a_rank_that_wrote_why_it_failed_is_named(store: Any) -> None:
    events = Events()
    beats = [beat_forever(store, 1), beat_forever(store, 2)]
    watch = monitor(store, events)
    store.set("failed/2", "rank 2 failed while loading its shard: OSError: disk")
    assert events.seen.wait(5)
    assert events.failures == [(2, "rank 2 failed while loading its shard: OSError: disk")]
    watch.stop()
    for beat in beats:
        beat.stop()


def test_a_local_rank_that_exited_is_named_with_its_signal(store: Any) -> None:
    events = Events()
    watch = monitor(store, events, exited=lambda: (1, -9))
    assert events.seen.wait(5)
    assert events.failures == [(1, "the process exited (killed by SIGKILL)")]
    watch.stop()


def test_a_silent_rank_is_named_after_the_timeout(store: Any) -> None:
    events = Events()
    beat = beat_forever(store, 1)  # rank 2 never beats
    started = time.monotonic()
    watch = monitor(store, events, timeout=0.5)
    assert events.seen.wait(5)
    rank, reason = events.failures[0]
    assert rank == 2 and "no heartbeat for" in reason
    assert time.monotonic() - started >= 0.5
    watch.stop()
    beat.stop()


def test_a_rank_asked_to_stop_is_reported_apart(store: Any) -> None:
    events = Events()
    beats = [beat_forever(store, 1), beat_forever(store, 2)]
    watch = monitor(store, events)
    store.set("stop/1", "SIGTERM")
    assert events.seen.wait(5)
    assert events.stops == [1] and events.failures == []
    watch.stop()
    for beat in beats:
        beat.stop()


def test_a_worker_leaves_when_rank_0_aborts_the_group(store: Any) -> None:
    lost: list[str] = []
    done = threading.Event()
    beat = Heartbeat(
        lambda: client(store), 1, 0.02, on_lost=lambda reason: (lost.append(reason), done.set())
    )
    beat.start()
    store.set("abort", "rank 2: the process exited (exit code 3)")
    assert done.wait(5)
    assert lost == ["rank 0 shut the group down: rank 2: the process exited (exit code 3)"]


def test_exit_codes_read_as_words() -> None:
    assert describe_exit(3) == "exit code 3"
    assert describe_exit(-15) == "killed by SIGTERM"
