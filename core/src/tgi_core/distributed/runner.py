"""Rank 0's model runner: broadcast the step's plan, then run the step on its own shard.

:class:`ShardedModelRunner` is a :class:`~tgi_core.engine.model_runner.ModelRunner`
whose ``execute`` first sends the step's :class:`~tgi_core.distributed.plan.StepPlan`
on the control group; every worker rebuilds the same arguments and calls the same
``execute``, so the model's collectives (all-reduces after row-parallel layers, the
gather of the vocabulary-parallel logits) pair up across ranks. Block copies are held
until the next plan and applied on every rank before its forward. The engine above it
is unchanged: logits come back whole on rank 0, and sampling happens there, once.

While the engine is idle, a thread sends heartbeat plans every ``interval`` seconds so
that the workers, waiting for the next plan, can tell an idle rank 0 from a dead one.
One lock orders every plan, so all ranks see them in the same order.

A failure in any collective breaks the group for good (the ranks are no longer in
step): the runner reports it once through ``on_failure`` and refuses every later step
with :class:`~tgi_core.distributed.group.ShardError`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from collections.abc import Sequence as Seq
from typing import Any

import torch
from torch import nn

from tgi_core.attention.backend import AttentionBackend
from tgi_core.distributed.group import ShardError
from tgi_core.distributed.plan import PlanKind, StepPlan, send_plan
from tgi_core.engine.model_runner import ModelRunner
from tgi_core.engine.scheduler import ScheduledChunk


class ShardedModelRunner(ModelRunner):
    """A ModelRunner for rank 0 of a tensor-parallel group."""

    def __init__(
        self,
        model: nn.Module,
        backend: AttentionBackend,
        *,
        control: Any,
        interval: float,
        on_failure: Callable[[str], None],
        **runner_args: Any,
    ) -> None:
        super().__init__(model, backend, **runner_args)
        self._control, self._interval, self._on_failure = control, interval, on_failure
        self._lock = threading.Lock()
        self._pending_copies: list[tuple[int, int]] = []
        self._last_sent = time.monotonic()
        self.failure: str | None = None
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._heartbeats, name="tgi-plans", daemon=True)

    def start(self) -> None:
        """Start sending heartbeat plans while idle."""
        self._thread.start()

    def copy_blocks(self, copies: Seq[tuple[int, int]]) -> None:
        """Hold the copies: every rank applies them before the next step's forward."""
        self._pending_copies.extend(copies)

    @torch.inference_mode()
    def execute(
        self, chunks: Seq[ScheduledChunk], logits_for: Seq[str]
    ) -> list[torch.Tensor | None]:
        with self._lock:
            self._check()
            copies, self._pending_copies = self._pending_copies, []
            try:
                self._send(StepPlan.from_scheduled(chunks, logits_for, copies))
                super().copy_blocks(copies)
                return super().execute(chunks, logits_for)
            except Exception as exc:
                raise self._fail(f"a step failed on rank 0: {_one_line(exc)}") from exc

    def close(self, timeout: float = 5.0) -> None:
        """Stop the heartbeats; tell the workers to leave, if the group is still sound.

        A step still in flight (the engine thread stuck in a collective) gets ``timeout``
        seconds to end; after that the workers are not told (they are aborted instead).
        """
        self._closed.set()
        if self.failure is not None:
            return
        if not self._lock.acquire(timeout=timeout):
            self.failure = "a step was still running at shutdown"
            return
        try:
            if self.failure is None:
                self._send(StepPlan(PlanKind.SHUTDOWN))
        except Exception as exc:  # the workers are gone already
            self.failure = f"the shutdown plan could not be sent: {_one_line(exc)}"
        finally:
            self._lock.release()

    def mark_failed(self, reason: str) -> None:
        """The group failed (this runner or the monitor saw it): refuse later steps."""
        self.failure = reason

    def _send(self, plan: StepPlan) -> None:
        send_plan(plan, self._control)
        self._last_sent = time.monotonic()

    def _check(self) -> None:
        if self.failure is not None:
            raise ShardError(f"the tensor-parallel group has failed: {self.failure}")
        if self._closed.is_set():
            raise ShardError("the tensor-parallel group is shutting down")

    def _fail(self, reason: str) -> ShardError:
        if self.failure is None:
            self.failure = reason
            self._on_failure(reason)
        return ShardError(f"the tensor-parallel group has failed: {self.failure}")

    def _heartbeats(self) -> None:
        while not self._closed.wait(self._interval / 2):
            if time.monotonic() - self._last_sent < self._interval:
                continue
            with self._lock:
                if self.failure is not None or self._closed.is_set():
                    return
                try:
                    self._send(StepPlan(PlanKind.HEARTBEAT))
                except Exception as exc:
                    self._fail(f"a heartbeat plan could not be sent: {_one_line(exc)}")
                    return


def _one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:400]
