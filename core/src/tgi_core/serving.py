"""``tgi-core serve``: resolve plugins and config, load the model, run the HTTP server.

With tensor parallelism (``--num-shard N``, or a launcher's ``WORLD_SIZE``), rank 0 runs
the server and the other ranks run :func:`~tgi_core.distributed.worker.run_worker`.
"""

from __future__ import annotations

from typing import Any

from tgi_core.config import ResolvedConfig
from tgi_core.logging import configure_logging, get_logger
from tgi_core.plugins import make_plugin_manager
from tgi_core.registry import Registry

#: Seconds ``/health`` answers 503 after the tensor-parallel group failed, before the
#: server stops accepting connections (so that probes see why).
FAILURE_GRACE = 2.0


def serve(resolved: ResolvedConfig) -> None:
    """Serve with ``resolved`` until the process is told to stop (SIGINT, SIGTERM).

    Raises :class:`~tgi_core.errors.TGIError` subclasses for anything a user can fix,
    and :class:`~tgi_core.distributed.group.ShardError` after a rank failed. On SIGTERM,
    uvicorn stops accepting connections and gives requests in flight
    ``graceful_termination_timeout`` seconds to finish; then the other ranks are told to
    stop.
    """
    config = resolved.config
    configure_logging(json_output=config.json_output, level=config.log_level)
    log = get_logger("tgi_core.serve")
    registry = Registry.build(make_plugin_manager())
    resolved = resolved.with_registry(registry)
    log.info(
        "plugins loaded",
        plugins=[f"{info.distribution}=={info.version}" for info in registry.plugins],
        architectures=registry.models.architectures(),
    )
    from tgi_core.distributed.topology import resolve_topology

    topology = resolve_topology(resolved)
    if topology.sharded and not topology.is_driver:
        _serve_as_worker(resolved, topology)
        return
    import uvicorn

    from tgi_core.engine.threads import reserve_threads_for_engine
    from tgi_core.server.app import build_app
    from tgi_core.server.builder import build_state

    shards = _start_shards(resolved, topology) if topology.sharded else None
    engine_threads = reserve_threads_for_engine()  # before the model loads
    try:
        state = build_state(resolved, registry, shards, engine_threads=engine_threads)
    except BaseException as exc:
        if shards is not None:
            shards.abort(f"rank 0 failed to start: {exc}")
        raise
    try:
        app = build_app(state, registry, resolved.plugin_sections)
        server = uvicorn.Server(
            uvicorn.Config(
                app,
                host=config.hostname,
                port=config.port,
                log_config=None,
                timeout_graceful_shutdown=config.graceful_termination_timeout,
            )
        )
        if shards is not None:
            _watch_shards(shards, state, server)
        log.info("serving", host=config.hostname, port=config.port, model=state.model.model_id)
        server.run()
    finally:
        if shards is not None:
            shards.shutdown()
    if shards is not None and shards.failure is not None:
        from tgi_core.distributed.group import ShardError

        raise ShardError(f"the tensor-parallel group failed: {shards.failure}")


def _start_shards(resolved: ResolvedConfig, topology: Any) -> Any:
    from tgi_core.distributed.supervisor import ShardSupervisor
    from tgi_core.model.base import DTYPES, default_dtype

    config = resolved.config
    dtype = DTYPES[config.dtype] if config.dtype else default_dtype()
    return ShardSupervisor.start(config, topology, dtype)


def _watch_shards(shards: Any, state: Any, server: Any) -> None:
    """A failed group makes the server unhealthy, then stops it; a rank asked to stop
    stops it gracefully. The group stops with the server."""
    import threading

    def stop_later() -> None:
        server.should_exit = True

    def failed(reason: str) -> None:
        state.failure = reason
        threading.Timer(FAILURE_GRACE, stop_later).start()

    def stop_requested(rank: int) -> None:
        server.should_exit = True

    shards.on_failure = failed
    shards.on_stop = stop_requested
    state.on_shutdown.append(shards.shutdown)


def _serve_as_worker(resolved: ResolvedConfig, topology: Any) -> None:
    """Rank > 0 under a launcher (torchrun): no HTTP server, only the plans."""
    from tgi_core.distributed.group import ShardError
    from tgi_core.distributed.worker import run_worker

    if run_worker(resolved.config, topology) != 0:
        raise ShardError(f"rank {topology.rank} left the group after a failure (see its log)")
