"""Every rank but 0: load this rank's shard, then run the plans rank 0 broadcasts.

A worker joins the group, loads its slices of the checkpoint (with the dtype rank 0
chose and the same quantizer, which quantizes or reads only this rank's slices),
reports ``loaded/R``, allocates the KV cache rank 0 sized (``setup``), reports
``ready/R``, then loops: wait for a plan, apply its block copies, run
``ModelRunner.execute`` with the plan's arguments; a heartbeat plan is only a sign of
life, a shutdown plan ends the loop (exit code 0).

Anything that goes wrong is written to the store (``failed/R``, so rank 0's log names
this rank and the reason) and ends the process with exit code 1: a timeout waiting for a
plan (rank 0 hung), a closed connection (rank 0 died), a failed step. SIGTERM and SIGINT
ask rank 0 to shut the whole group down gracefully (``stop/R``); the worker keeps
running plans until rank 0 sends the shutdown plan.

``python -m tgi_core.distributed.worker`` is how rank 0 starts its local workers (see
``launcher``); under torchrun, ``tgi-core serve`` calls :func:`run_worker` itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from typing import Any

import torch

from tgi_core.config import ServeConfig
from tgi_core.distributed.group import ShardGroup, connect_store, use_local_cpus
from tgi_core.distributed.liveness import Heartbeat, heartbeat_interval
from tgi_core.distributed.plan import PlanKind, receive_plan
from tgi_core.distributed.topology import Topology
from tgi_core.logging import configure_logging, get_logger

log = get_logger("tgi_core.distributed")


def _one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:400]


def wait_for_key(store: Any, key: str, timeout: float) -> dict[str, Any]:
    """The JSON value rank 0 publishes under ``key``, waiting up to ``timeout`` s."""
    from datetime import timedelta

    store.wait([key], timedelta(seconds=timeout))
    value: dict[str, Any] = json.loads(bytes(store.get(key)))
    return value


def run_worker(config: ServeConfig, topology: Topology, *, parent_pid: int | None = None) -> int:
    """Serve as rank ``topology.rank`` until rank 0 shuts the group down; the exit code."""
    from tgi_core.config import validate_plugin_sections
    from tgi_core.engine.model_runner import ModelRunner
    from tgi_core.model.base import DTYPES, ModelContext
    from tgi_core.model.loader import load_model
    from tgi_core.model.sources import resolve_model_id
    from tgi_core.plugins import make_plugin_manager
    from tgi_core.registry import Registry

    rank = topology.rank
    log.info("shard starting", rank=rank, world_size=topology.world_size, pid=os.getpid())
    store = connect_store(topology, config.shard_startup_timeout)
    store.set(f"joined/{rank}", "1")

    def lost(reason: str) -> None:  # from the heartbeat thread: nothing left to serve
        log.error("shard leaving the group", rank=rank, reason=reason)
        sys.stderr.flush()
        os._exit(1)

    heartbeat = Heartbeat(
        lambda: connect_store(topology, config.shard_timeout),
        rank,
        heartbeat_interval(config.shard_timeout),
        on_lost=lost,
        parent_pid=parent_pid,
    )
    heartbeat.start()
    _forward_stop_signals(store, rank)
    group: ShardGroup | None = None
    stage = "joining the group"
    try:
        group = ShardGroup.initialise(
            topology, store, timeout=config.shard_timeout, device=torch.device("cpu")
        )
        use_local_cpus(topology)
        stage = "loading its shard"
        model_setup = wait_for_key(store, "model", config.shard_startup_timeout)
        dtype = DTYPES[model_setup["dtype"]]
        registry = Registry.build(make_plugin_manager())
        model_dir, _, _ = resolve_model_id(config.model_id, registry)
        sections = validate_plugin_sections(config.plugins, {}, registry)
        loaded = load_model(
            model_dir,
            registry,
            ctx=ModelContext(dtype=dtype),
            quantize=config.quantize,
            plugin_sections=sections,
        )
        loaded_info = {"weight_bytes": loaded.weight_bytes, "bytes_read": loaded.bytes_read}
        log.info("shard loaded", rank=rank, **loaded_info)
        store.set(f"loaded/{rank}", json.dumps(loaded_info))
        stage = "allocating its KV cache"
        setup = wait_for_key(store, "setup", config.shard_startup_timeout)
        backend = registry.attention_backends[setup["attention"]].load()()
        runner = ModelRunner(
            loaded.model,
            backend,
            num_blocks=setup["num_blocks"],
            block_size=setup["block_size"],
            model_dtype=dtype,
        )
        store.set(f"ready/{rank}", "1")
        log.info("shard ready", rank=rank, kv_blocks=setup["num_blocks"])
        stage = "running plans"
        steps = _serve_plans(group, runner)
    except Exception as exc:
        reason = f"{stage}: {_one_line(exc)}"
        log.error("shard failed", rank=rank, reason=reason)
        heartbeat.stop()
        with contextlib.suppress(Exception):  # the store is gone with rank 0: nobody to tell
            store.set(f"failed/{rank}", f"rank {rank} failed while {reason}")
        return 1
    heartbeat.stop()
    log.info("shard stopped", rank=rank, steps=steps)
    group.close()
    return 0


def _serve_plans(group: ShardGroup, runner: Any) -> int:
    """Run plans until the shutdown plan; returns the number of steps run."""
    steps = 0
    while True:
        plan = receive_plan(group.control)
        if plan.kind is PlanKind.SHUTDOWN:
            return steps
        if plan.kind is PlanKind.HEARTBEAT:
            continue
        runner.copy_blocks(plan.copies)
        chunks, modes = plan.runner_inputs()
        runner.execute(chunks, modes)
        steps += 1


def _forward_stop_signals(store: Any, rank: int) -> None:
    """SIGTERM / SIGINT ask rank 0 to stop the group (it then sends the shutdown plan)."""

    def handler(signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        log.info("shard asked to stop; asking rank 0 to shut the group down", signal=name)
        with contextlib.suppress(Exception):  # rank 0 is gone: the heartbeat thread ends us
            store.set(f"stop/{rank}", name)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def main() -> None:
    """``python -m tgi_core.distributed.worker``: a worker rank 0 started on this machine."""
    import msgspec

    from tgi_core.config import FIELDS, ResolvedConfig, Source
    from tgi_core.distributed.launcher import CONFIG_VARIABLE, PARENT_VARIABLE
    from tgi_core.distributed.topology import resolve_topology

    config = msgspec.json.decode(os.environ[CONFIG_VARIABLE], type=ServeConfig)
    configure_logging(json_output=config.json_output, level=config.log_level)
    resolved = ResolvedConfig(config, {name: Source("default") for name in FIELDS})
    topology = resolve_topology(resolved)
    started = time.monotonic()
    code = run_worker(config, topology, parent_pid=int(os.environ[PARENT_VARIABLE]))
    log.debug("shard exiting", rank=topology.rank, code=code, seconds=time.monotonic() - started)
    sys.exit(code)


if __name__ == "__main__":
    main()
