"""From a resolved config to a ready :class:`ServerState`: model, tokenizer, engine."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from tgi_core.config import ResolvedConfig
from tgi_core.errors import ConfigError
from tgi_core.logging import get_logger
from tgi_core.model.sources import resolve_model_id
from tgi_core.registry import Registry
from tgi_core.server.chat_template import ChatTemplate, ChatTemplateError
from tgi_core.server.metrics import ServerMetrics
from tgi_core.server.state import ModelInfo, ServerState

if TYPE_CHECKING:
    from tgi_core.distributed.supervisor import ShardSupervisor

log = get_logger("tgi_core.server")
#: Share of the memory available after loading that the KV cache may take by default.
KV_MEMORY_FRACTION = 0.5


def _available_memory() -> int:
    try:
        with open("/proc/meminfo", encoding="utf-8") as file:
            for line in file:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 * 1024**3


def _weight_bytes(model: Any) -> int:
    """Bytes held by a model's parameters and buffers."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())


def _eos_ids(checkpoint: Any, tokenizer: Any) -> tuple[int, ...]:
    ids: list[int] = []
    for source in (checkpoint.generation_config or {}, checkpoint.config):
        value = source.get("eos_token_id")
        ids.extend(value if isinstance(value, list) else [] if value is None else [value])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return tuple(dict.fromkeys(int(i) for i in ids))


#: generation_config.json fields that become the OpenAI frontend's sampling defaults
SAMPLING_DEFAULT_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def sampling_defaults(generation_config: dict[str, Any] | None) -> dict[str, float]:
    """The sampling settings a checkpoint's generation config sets (vLLM applies them to
    requests that leave them out); ignored where ``do_sample`` is false or a value is not
    a finite number."""
    config = generation_config or {}
    if not config.get("do_sample", False):
        return {}
    found = {}
    for name in SAMPLING_DEFAULT_FIELDS:
        value = config.get(name)
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            found[name] = float(value)
    return found


def _decoder_start(hf_config: Any) -> int:
    """An encoder-decoder model's first decoder token (T5: the pad token, 0)."""
    for name in ("decoder_start_token_id", "pad_token_id"):
        value = getattr(hf_config, name, None)
        if value is not None:
            return int(value)
    raise ConfigError("the encoder-decoder model's config names no decoder_start_token_id")


def build_state(
    resolved: ResolvedConfig,
    registry: Registry,
    shards: ShardSupervisor | None = None,
    *,
    engine_threads: int | None = None,
) -> ServerState:
    """Load the model and its tokenizer, size the KV cache, build the engine.

    ``engine_threads``: torch's intra-op threads in the engine thread (``serve`` gives
    the machine's, having left the main thread one: :mod:`tgi_core.engine.threads`).

    With ``shards`` (rank 0 of a tensor-parallel group), the model is this rank's shard,
    the KV cache is sized once every rank has loaded (the machine's memory is shared by
    its ranks), and the runner broadcasts each step's plan to the other ranks.
    """
    import torch
    from transformers import AutoTokenizer

    from tgi_core.attention.kv_cache import KVCache
    from tgi_core.attention.selection import required_features, select_backend
    from tgi_core.engine.async_engine import AsyncEngine
    from tgi_core.engine.engine import Engine, EngineConfig
    from tgi_core.engine.model_runner import ModelRunner
    from tgi_core.model.base import DTYPES, ModelContext, default_dtype
    from tgi_core.model.checkpoint import Checkpoint
    from tgi_core.model.layers.attention import Attention
    from tgi_core.model.loader import load_model, select_model_spec

    config = resolved.config
    model_dir, how, model_name = resolve_model_id(config.model_id, registry)
    if how == "default":
        log.info(f"no --model-id given; serving the demo model from {model_dir}")
    spec = select_model_spec(Checkpoint.open(model_dir), registry)
    select_backend(spec, registry, config.attention)  # fail fast, before loading
    dtype = DTYPES[config.dtype] if config.dtype else default_dtype()
    loaded = load_model(
        model_dir,
        registry,
        ctx=ModelContext(dtype=dtype),
        progress=True,
        quantize=config.quantize,
        plugin_sections=resolved.plugin_sections,
    )
    if loaded.quantizer is not None:
        log.info(
            "model quantized",
            quantizer=loaded.quantizer,
            linear_layers=loaded.quantized_layers,
            weight_mib=round(_weight_bytes(loaded.model) / 2**20),
        )
    backend_spec = select_backend(
        spec, registry, config.attention, needs=required_features(loaded.model)
    )
    backend = backend_spec.load()()
    local_ranks = 1
    if shards is not None:
        shards.wait_loaded(loaded.weight_bytes, loaded.bytes_read)
        local_ranks = shards.topology.local_world_size
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except Exception as exc:
        raise ConfigError(f"cannot load the tokenizer of {model_dir}: {exc}") from None

    layers = [m for m in loaded.model.modules() if isinstance(m, Attention)]
    block_bytes = KVCache.bytes_per_block(layers, config.block_size, backend.kv_cache_dtype(dtype))
    context = int(getattr(loaded.hf_config, "max_position_embeddings", 0) or 0)
    if config.max_batch_total_tokens is not None:
        num_blocks = -(-config.max_batch_total_tokens // config.block_size)
    else:
        share = _available_memory() * KV_MEMORY_FRACTION / local_ranks
        num_blocks = max(1, int(share // block_bytes))
        # no more than every admitted request at its longest could hold at once
        longest = config.max_total_tokens or context
        if longest:
            needed = config.max_concurrent_requests * (-(-longest // config.block_size))
            num_blocks = min(num_blocks, needed)
    capacity = num_blocks * config.block_size
    context = context or capacity
    max_total = config.max_total_tokens or min(context, capacity)
    if max_total > capacity:
        raise ConfigError(
            f"max_total_tokens ({max_total}) exceeds the KV cache ({capacity} "
            "tokens); lower it or raise max_batch_total_tokens"
        )
    max_input = config.max_input_tokens or max_total - 1
    runner_args: dict[str, Any] = {
        "num_blocks": num_blocks,
        "block_size": config.block_size,
        "model_dtype": dtype,
    }
    runner = (
        ModelRunner(loaded.model, backend, compile=config.compile, **runner_args)
        if shards is None
        else shards.build_runner(loaded.model, backend, attention=backend_spec.name, **runner_args)
    )
    engine = Engine(
        runner,
        EngineConfig(
            num_blocks=num_blocks,
            block_size=config.block_size,
            max_batch_tokens=config.max_batch_prefill_tokens,
            max_batch_size=config.max_batch_size,
            chunked_prefill=config.prefill_chunking,
            prefix_caching=config.prefix_caching,
            eos_token_ids=_eos_ids(loaded.checkpoint, tokenizer),
            decoder_start_token_id=_decoder_start(loaded.hf_config)
            if spec.kind == "seq2seq"
            else None,
        ),
        tokenizer,
    )
    log.info(
        "engine ready",
        kv_blocks=num_blocks,
        kv_tokens=capacity,
        kv_mib=round(num_blocks * block_bytes / 2**20),
        max_total_tokens=max_total,
        max_input_tokens=max_input,
        dtype=str(dtype).removeprefix("torch."),
        attention=backend_spec.name,
        threads=engine_threads or torch.get_num_threads(),
        num_shard=shards.world_size if shards is not None else 1,
    )
    model = ModelInfo(
        model_id=model_name,
        dtype=str(dtype).removeprefix("torch."),
        attention=backend_spec.name,
        block_size=config.block_size,
        max_input_tokens=max_input,
        max_total_tokens=max_total,
        architecture=type(loaded.model).__name__,
        is_encoder_decoder=spec.kind == "seq2seq",
        pipeline_tag="text2text-generation" if spec.kind == "seq2seq" else "text-generation",
        kv_tokens=capacity,
        vocab_size=int(getattr(loaded.hf_config, "vocab_size", 0) or len(tokenizer)),
        sampling_defaults=sampling_defaults(loaded.checkpoint.generation_config),
        num_shard=shards.world_size if shards is not None else 1,
    )
    plugins = [
        {"name": p.name, "distribution": p.distribution, "version": p.version}
        for p in registry.plugins
    ]
    async_engine = AsyncEngine(engine, threads=engine_threads, warm_up=config.compile)
    metrics = ServerMetrics(
        lambda: async_engine.stats,
        max_input_tokens=max_input,
        max_total_tokens=max_total,
        kv_tokens=capacity,
    )
    engine.step_observer = metrics.observe_step
    return ServerState(
        config=config,
        engine=async_engine,
        tokenizer=tokenizer,
        model=model,
        plugins=plugins,
        chat_template=_chat_template(model_dir, config.tokenizer_config_path, tokenizer),
        metrics=metrics,
    )


def _chat_template(model_dir: str, override: str | None, tokenizer: Any) -> ChatTemplate | None:
    try:
        template = ChatTemplate.load(model_dir, override, tokenizer=tokenizer)
    except ChatTemplateError as exc:
        raise ConfigError(f"cannot load the chat template: {exc}") from None
    if template is None:
        log.warning("the model has no chat template; /v1/chat/completions will answer 422")
    else:
        log.info("chat template loaded", origin=template.origin)
    return template
