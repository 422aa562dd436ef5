"""Rank 0's side of the group: start it, keep watch over it, shut it down.

``ShardSupervisor.start`` hosts the store, starts the local workers (``--num-shard N``)
or waits for the launcher's (torchrun), waits until every rank joined, initialises
torch.distributed and publishes the dtype every rank loads in. The server builder then
calls :meth:`wait_loaded` (after rank 0 loaded its own shard) and :meth:`build_runner`
(which publishes the KV-cache size and the attention backend, waits until every rank is
ready, and starts the monitor and the heartbeat plans).

Failure: the first failure anyone sees (the monitor: a rank exited, wrote why it
stopped, or went silent; the runner: a collective failed or timed out) is logged once,
with the rank and the reason, written to the store as ``abort`` (every worker then
leaves), and handed to ``on_failure`` (the server turns unhealthy and shuts down).
A rank asked to stop (SIGTERM) is handed to ``on_stop`` (a graceful shutdown).
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from tgi_core.attention.backend import AttentionBackend
from tgi_core.config import ServeConfig
from tgi_core.distributed.group import ShardError, ShardGroup, connect_store, use_local_cpus
from tgi_core.distributed.launcher import LocalRanks
from tgi_core.distributed.liveness import Monitor, describe_exit, heartbeat_interval
from tgi_core.distributed.runner import ShardedModelRunner
from tgi_core.distributed.topology import Topology
from tgi_core.logging import get_logger

log = get_logger("tgi_core.distributed")
#: How long workers get to leave after the shutdown plan before they are terminated.
WORKER_EXIT_GRACE = 10.0


class ShardSupervisor:
    """Rank 0's handle on a started group."""

    def __init__(
        self, config: ServeConfig, topology: Topology, store: Any, local: LocalRanks | None
    ) -> None:
        self.config, self.topology, self.store, self.local = config, topology, store, local
        self.group: ShardGroup | None = None
        self.runner: ShardedModelRunner | None = None
        self.monitor: Monitor | None = None
        self.failure: str | None = None
        self.on_failure: Callable[[str], None] = lambda reason: None
        self.on_stop: Callable[[int], None] = lambda rank: None
        self._lock = threading.Lock()
        self._closed = False

    @property
    def world_size(self) -> int:
        return self.topology.world_size

    # -- startup ------------------------------------------------------------------
    @classmethod
    def start(cls, config: ServeConfig, topology: Topology, dtype: torch.dtype) -> ShardSupervisor:
        """Host the store, start local workers, wait for every rank, join torch.distributed."""
        store = connect_store(topology, config.shard_startup_timeout, host=True)
        local = LocalRanks.start(config, topology) if topology.launcher == "tgi" else None
        supervisor = cls(config, topology, store, local)
        log.info(
            "starting the tensor-parallel group",
            world_size=topology.world_size,
            launcher=topology.launcher,
            master=f"{topology.master_addr}:{topology.master_port}",
        )
        try:
            supervisor.wait_for("joined")
            supervisor.group = ShardGroup.initialise(
                topology, store, timeout=config.shard_timeout, device=torch.device("cpu")
            )
            use_local_cpus(topology)
            store.set("model", json.dumps({"dtype": str(dtype).removeprefix("torch.")}))
        except BaseException as exc:
            supervisor.abort(_one_line(exc))
            raise
        return supervisor

    def wait_for(self, stage: str) -> dict[int, bytes]:
        """Wait until every worker set ``<stage>/R``; their values, by rank.

        Raises ShardError naming the rank when one fails first (its reason, or its exit
        code) or when ``shard_startup_timeout`` passes.
        """
        timeout = self.config.shard_startup_timeout
        deadline = time.monotonic() + timeout
        waiting = set(range(1, self.world_size))
        while True:
            waiting = {r for r in waiting if not self.store.check([f"{stage}/{r}"])}
            for rank in range(1, self.world_size):
                if self.store.check([f"failed/{rank}"]):
                    raise ShardError(bytes(self.store.get(f"failed/{rank}")).decode())
            exited = self.local.exited() if self.local is not None else None
            if exited is not None:
                rank, code = exited
                raise ShardError(
                    f"rank {rank} failed to start: its process exited ({describe_exit(code)})"
                )
            if not waiting:
                return {r: bytes(self.store.get(f"{stage}/{r}")) for r in range(1, self.world_size)}
            if time.monotonic() > deadline:
                missing = ", ".join(map(str, sorted(waiting)))
                raise ShardError(
                    f"rank(s) {missing} did not finish {_STAGES.get(stage, stage)} within "
                    f"{timeout:g} s (--shard-startup-timeout)"
                )
            time.sleep(0.05)

    def wait_loaded(self, weight_bytes: int, bytes_read: int) -> None:
        """Wait until every rank loaded its shard; log each rank's weight memory."""
        log.info("shard loaded", rank=0, weight_bytes=weight_bytes, bytes_read=bytes_read)
        for rank, value in self.wait_for("loaded").items():
            log.debug("rank loaded", rank=rank, **json.loads(value))

    def build_runner(
        self,
        model: nn.Module,
        backend: AttentionBackend,
        *,
        attention: str,
        num_blocks: int,
        block_size: int,
        model_dtype: torch.dtype,
    ) -> ShardedModelRunner:
        """Publish the KV cache's size and the backend; once every rank allocated its
        cache, start watching the group and return rank 0's runner."""
        assert self.group is not None
        self.store.set(
            "setup",
            json.dumps(
                {"num_blocks": num_blocks, "block_size": block_size, "attention": attention}
            ),
        )
        runner = ShardedModelRunner(
            model,
            backend,
            control=self.group.control,
            interval=heartbeat_interval(self.config.shard_timeout),
            on_failure=lambda reason: self.fail(-1, reason),
            num_blocks=num_blocks,
            block_size=block_size,
            model_dtype=model_dtype,
        )
        self.wait_for("ready")
        self.runner = runner
        self.monitor = Monitor(
            lambda: connect_store(self.topology, self.config.shard_timeout),
            self.world_size,
            timeout=self.config.shard_timeout,
            exited=self.local.exited if self.local is not None else lambda: None,
            on_failure=self.fail,
            on_stop=self._stop_requested,
        )
        self.monitor.start()
        runner.start()
        log.info("tensor-parallel group ready", world_size=self.world_size)
        return runner

    # -- failure and shutdown -----------------------------------------------------
    def fail(self, rank: int, reason: str) -> None:
        """Record the group's first failure, tell every rank, hand it to ``on_failure``.

        ``rank`` -1: the rank is not known yet (a collective failed); the monitor is
        given a moment to name it.
        """
        with self._lock:
            if self.failure is not None or self._closed:
                return
            if rank < 0:
                rank, reason = self._name_the_rank(reason)
            where = f"rank {rank}: " if rank >= 0 else ""
            self.failure = f"{where}{reason}"
        log.error("tensor-parallel group failed", rank=rank, reason=reason)
        if self.runner is not None:
            self.runner.mark_failed(self.failure)
        self._abort_workers(self.failure)
        self.on_failure(self.failure)

    def _name_the_rank(self, reason: str) -> tuple[int, str]:
        """A failed collective does not say which rank is at fault; a rank that exited
        or wrote why it stopped does, and usually within a moment."""
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            exited = self.local.exited() if self.local is not None else None
            if exited is not None:
                return exited[0], f"the process exited ({describe_exit(exited[1])})"
            for rank in range(1, self.world_size):
                if self.store.check([f"failed/{rank}"]):
                    return rank, bytes(self.store.get(f"failed/{rank}")).decode()
            time.sleep(0.05)
        return -1, reason

    def _stop_requested(self, rank: int) -> None:
        log.info("rank asked to stop; shutting the group down", rank=rank)
        self.on_stop(rank)

    def _abort_workers(self, reason: str) -> None:
        # the store is ours; if it fails, the workers' own timeouts act
        with contextlib.suppress(Exception):
            self.store.set("abort", reason)

    def abort(self, reason: str) -> None:
        """Startup failed: make every worker leave, and stop the local ones."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.failure = self.failure or reason
        self._abort_workers(reason)
        if self.local is not None and not self.local.wait(2 * self._interval):
            self.local.terminate()

    def shutdown(self) -> None:
        """Stop the group: the shutdown plan if it is sound, then wait for (or terminate)
        the local workers. Safe to call more than once."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self.monitor is not None:
            self.monitor.stop()
        if self.runner is not None:
            self.runner.close()
            if self.runner.failure is not None and self.failure is None:
                self.failure = self.runner.failure
        if self.failure is not None:
            self._abort_workers(self.failure)
        if self.local is not None:
            if self.failure is None:
                if not self.local.wait(WORKER_EXIT_GRACE):
                    self.local.terminate()
            elif not self.local.wait(2 * self._interval):  # the abort reaches them first
                self.local.terminate(grace=1.0)  # a hung rank ignores SIGTERM
        if self.failure is None and self.group is not None:
            self.group.close()
        log.info("tensor-parallel group stopped", failure=self.failure)

    @property
    def _interval(self) -> float:
        return heartbeat_interval(self.config.shard_timeout)


_STAGES = {"joined": "joining the group", "loaded": "loading", "ready": "allocating the KV cache"}


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:400] or type(exc).__name__
