"""The quantizer seam: how the loader chooses a quantizer, binds each linear layer to
its method, shards quantized parameters by their layout, and refuses what it cannot
serve. A miniature quantizer (float16 storage) stands in for the real plugins."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tgi_core
from tgi_core.errors import ConfigError
from tgi_core.model.base import ModelContext
from tgi_core.model.checkpoint import CheckpointError
from tgi_core.model.layers.linear import (
    ColumnParallelLinear,
    LinearBase,
    ParamLayout,
    QKVParallelLinear,
    RowParallelLinear,
    UnquantizedLinearMethod,
    deferred_linear_methods,
    set_layout,
)
from tgi_core.model.loader import load_model
from tgi_core.model.parallel import ParallelContext
from tgi_core.model.quantization import QuantizerContext
from tgi_core.model.weights import LazyTensor
from tgi_core.plugins import PluginInfo, make_plugin_manager
from tgi_core.registry import Registry


class Float16Method:
    """Keeps the weight in float16 and computes in the activations' dtype."""

    def __init__(self, events: list[tuple[str, str]], prefix: str) -> None:
        self.events, self.prefix = events, prefix

    def create_weights(self, layer: LinearBase, dtype: torch.dtype) -> None:
        weight = nn.Parameter(
            torch.empty(
                layer.output_size_per_partition,
                layer.input_size_per_partition,
                dtype=torch.float16,
            ),
            requires_grad=False,
        )

        def loader(param: nn.Parameter, loaded: LazyTensor, shard_id: Any = None) -> None:
            self.events.append(("load", self.prefix))
            layer.weight_loader(param, loaded, shard_id)

        weight.weight_loader = loader  # type: ignore[attr-defined]
        layer.register_parameter("weight", weight)

    def apply(self, layer: LinearBase, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, layer.weight.to(x.dtype), bias)

    def process_weights_after_loading(self, layer: LinearBase) -> None:
        self.events.append(("process", self.prefix))


class Float16Quantizer:
    def __init__(self, ctx: QuantizerContext) -> None:
        self.ctx = ctx
        self.events: list[tuple[str, str]] = []
        self.prefixes: list[str] = []
        if ctx.quantization_config and ctx.quantization_config.get("bits") != 16:
            raise ValueError(f"only 16-bit checkpoints, not {ctx.quantization_config['bits']}")

    def linear_method(self, layer: LinearBase, prefix: str) -> Float16Method | None:
        self.prefixes.append(prefix)
        if prefix.endswith("down_proj"):  # a layer it keeps in float
            return None
        if prefix.endswith("o_proj") and layer.input_size_per_partition < 32:
            raise ValueError("fewer than 32 input features")
        return Float16Method(self.events, prefix)


BUILT: list[Float16Quantizer] = []


def make_float16(ctx: QuantizerContext) -> Float16Quantizer:
    BUILT.append(Float16Quantizer(ctx))
    return BUILT[-1]


class Plugin:
    @tgi_core.hookimpl
    def register_quantizers(self, register: Any) -> None:
        register(tgi_core.QuantizerSpec(name="f16", factory=make_float16, quant_methods=("f16",)))
        register(
            tgi_core.QuantizerSpec(
                name="loads-only",
                factory=make_float16,
                quant_methods=("lo",),
                quantizes_at_load=False,
            )
        )


@pytest.fixture
def registry() -> Registry:
    """tgi-llama and the miniature quantizer, and no other installed plugin."""
    BUILT.clear()
    extra = [(Plugin(), PluginInfo("f16", "local", "0", "f16"))]
    manager = make_plugin_manager(environ={"TGI_LOAD_PLUGINS": "tgi-llama"}, extra_plugins=extra)
    return Registry.build(manager)


def with_quantization_config(source: Path, target: Path, qconfig: Any) -> Path:
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    config["quantization_config"] = qconfig
    (target / "config.json").write_text(json.dumps(config))
    return target


@torch.inference_mode()
def test_every_linear_layer_is_bound_and_processed_when_complete(
    registry: Any, tiny_llama: Path
) -> None:
    loaded = load_model(str(tiny_llama), registry, ctx=ModelContext(), quantize="f16")
    quantizer = BUILT[-1]
    linear = [n for n, m in loaded.model.named_modules() if isinstance(m, LinearBase)]
    assert quantizer.prefixes == linear
    assert "model.layers.1.self_attn.qkv_proj" in linear
    assert loaded.quantizer == "f16" and loaded.quantized_layers == 3 * 2  # down_proj kept
    for name, module in loaded.model.named_modules():
        if isinstance(module, LinearBase):
            assert module.weight.dtype == (
                torch.float32 if name.endswith("down_proj") else torch.float16
            )
            assert isinstance(module.method, UnquantizedLinearMethod) == name.endswith("down_proj")
    # each layer is processed right after its last tensor (q, k, v: three loads), before
    # any other layer's tensor is read
    events = quantizer.events
    for prefix in {p for _, p in events}:
        loads = [i for i, (kind, p) in enumerate(events) if kind == "load" and p == prefix]
        assert events[loads[-1] + 1] == ("process", prefix)
        assert len(loads) == (3 if "qkv" in prefix else 2 if "gate_up" in prefix else 1)
    # and the float16 model computes what the float model computes, to float16 precision
    reference = load_model(str(tiny_llama), registry, ctx=ModelContext())
    for name in ("model.layers.0.self_attn.qkv_proj", "model.layers.0.mlp.gate_up_proj"):
        ours, theirs = loaded.model.get_submodule(name), reference.model.get_submodule(name)
        x = torch.randn(4, ours.input_size)
        torch.testing.assert_close(ours(x), theirs(x), rtol=2e-3, atol=2e-3)


def test_a_prequantized_checkpoint_selects_its_loader(
    registry: Any, tiny_llama: Path, tmp_path: Path
) -> None:
    path = with_quantization_config(tiny_llama, tmp_path / "q", {"quant_method": "F16", "bits": 16})
    loaded = load_model(str(path), registry, ctx=ModelContext())
    assert loaded.quantizer == "f16"
    assert BUILT[-1].ctx.quantization_config == {"quant_method": "F16", "bits": 16}
    assert BUILT[-1].ctx.name == "f16"


@pytest.mark.parametrize(
    ("qconfig", "quantize", "error", "message"),
    [
        (
            None,
            "loads-only",
            ConfigError,
            r"--quantize loads-only loads checkpoints already quantized with lo, but .*"
            r"has no quantization_config; to quantize a float checkpoint while loading "
            r"use one of: .*f16",
        ),
        (
            {"quant_method": "lo"},
            "f16",
            ConfigError,
            r"--quantize f16 cannot apply to .*: its weights are already quantized with "
            r"'lo' \(config.json quantization_config\); leave --quantize unset to load it "
            r"with loads-only",
        ),
        (
            {"quant_method": "gptq", "bits": 4},
            None,
            CheckpointError,
            r"is quantized with 'gptq' \(config.json quantization_config.quant_method\), "
            r"which no installed quantizer loads; install tgi-gptq \(pip install tgi-gptq\)\. "
            r"Quantizers that load checkpoints: .*f16 \(f16\), loads-only \(lo\)",
        ),
        (
            {"bits": 4},
            None,
            CheckpointError,
            r"config.json has a quantization_config without a quant_method",
        ),
        (
            {"quant_method": "f16", "bits": 8},
            None,
            ConfigError,
            r"quantizer 'f16' cannot serve .*: only 16-bit checkpoints, not 8",
        ),
        (["not", "an", "object"], None, CheckpointError, r"quantization_config must be an object"),
    ],
)
def test_combinations_that_cannot_be_served_are_clear_errors(
    registry: Any,
    tiny_llama: Path,
    tmp_path: Path,
    qconfig: Any,
    quantize: str | None,
    error: type[Exception],
    message: str,
) -> None:
    path = tiny_llama
    if qconfig is not None:
        path = with_quantization_config(tiny_llama, tmp_path / "q", qconfig)
    with pytest.raises(error, match=message):
        load_model(str(path), registry, ctx=ModelContext(), quantize=quantize)


def test_a_layer_the_method_refuses_is_named(registry: Any, tmp_path: Path) -> None:
    from transformers import LlamaConfig

    from tgi_core.model.fixtures import save_checkpoint

    path = save_checkpoint(
        tmp_path / "odd",
        LlamaConfig(
            vocab_size=32,
            hidden_size=16,
            intermediate_size=24,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=8,
        ),
    )
    with pytest.raises(
        CheckpointError,
        match=r"quantizer 'f16' cannot take layer model.layers.0.self_attn.o_proj: "
        r"fewer than 32 input features",
    ):
        load_model(str(path), registry, ctx=ModelContext(), quantize="f16")


def test_deferred_layers_wait_for_their_method() -> None:
    with deferred_linear_methods():
        layer = ColumnParallelLinear(4, 6, bias=True)
        explicit = ColumnParallelLinear(4, 6, method=UnquantizedLinearMethod())
    assert layer.method_pending and not hasattr(layer, "weight")
    assert layer.bias is not None  # the bias is the layer's own, never the method's
    assert not explicit.method_pending and explicit.weight.shape == (6, 4)
    with pytest.raises(RuntimeError, match="built for a quantizer but never bound"):
        layer(torch.randn(2, 4))
    layer.bind_method(UnquantizedLinearMethod())
    assert layer.weight.shape == (6, 4)
    with pytest.raises(RuntimeError, match="already has a method"):
        layer.bind_method(UnquantizedLinearMethod())
    assert not ColumnParallelLinear(4, 6).method_pending  # outside the context: at once


def packed_param(layer: LinearBase, shape: tuple[int, ...], layout: ParamLayout) -> nn.Parameter:
    param = nn.Parameter(torch.empty(shape, dtype=torch.int64), requires_grad=False)
    return set_layout(param, layout)


@pytest.mark.parametrize("world", (1, 2, 4))
def test_packed_and_grouped_parameters_shard_like_the_weight(world: int) -> None:
    """A parameter stored ``[in / 4, out]`` (4 input features per element, GPTQ-like)
    and one stored ``[groups, out / 2]`` (2 outputs per element, whole along the
    input): each rank gets exactly the elements of its features."""
    hidden, heads, kv_heads, head_dim = 16, 4, 2, 4
    q_rows, kv_rows = heads * head_dim, kv_heads * head_dim
    for tp in (ParallelContext(rank=r, world_size=world) for r in range(world)):
        # row-parallel: input columns of this rank
        row = RowParallelLinear(32, 8, tp=tp)
        stored = torch.arange(32 // 4 * 8).view(32 // 4, 8)  # element (i, o)
        param = packed_param(row, (row.input_size_per_partition // 4, 8), ParamLayout(1, 0, 1, 4))
        row.weight_loader(param, LazyTensor.of(stored, "qweight"))
        per = 32 // world // 4
        assert torch.equal(param.data, stored[tp.rank * per : (tp.rank + 1) * per])
        groups = torch.arange(2 * 4).view(2, 4)  # [groups, out / 2], whole along the input
        param = packed_param(row, (2, 4), ParamLayout(1, None, 2, 1))
        row.weight_loader(param, LazyTensor.of(groups, "qzeros"))
        assert torch.equal(param.data, groups)
        # column-parallel with parts: this rank's heads of q, k and v, 2 outputs per element
        qkv = QKVParallelLinear(hidden, head_dim, heads, kv_heads, tp=tp)
        param = packed_param(qkv, (2, qkv.output_size_per_partition // 2), ParamLayout(1, None, 2))
        parts = {}
        for shard, rows in (("q", q_rows), ("k", kv_rows), ("v", kv_rows)):
            parts[shard] = torch.arange(2 * rows // 2).view(2, rows // 2) + 1000 * len(parts)
            qkv.weight_loader(param, LazyTensor.of(parts[shard], shard), shard)
        q_per, kv_per = qkv.q_size // 2, qkv.kv_size // 2
        kv_index = tp.rank // qkv.kv_replicas
        expected = torch.cat(
            [
                parts["q"][:, tp.rank * q_per : (tp.rank + 1) * q_per],
                parts["k"][:, kv_index * kv_per : (kv_index + 1) * kv_per],
                parts["v"][:, kv_index * kv_per : (kv_index + 1) * kv_per],
            ],
            dim=1,
        )
        assert torch.equal(param.data, expected)


def test_a_slice_off_element_boundaries_is_refused() -> None:
    row = RowParallelLinear(12, 8, tp=ParallelContext(rank=1, world_size=2))
    param = packed_param(row, (1, 8), ParamLayout(1, 0, 1, 4))
    with pytest.raises(ValueError, match=r"6 input features before this rank do not fall on"):
        row.weight_loader(param, LazyTensor.of(torch.zeros(3, 8), "q"))
    param = packed_param(row, (6, 8), ParamLayout(1, 0, 1, 1))
    with pytest.raises(
        ValueError, match=r"q: checkpoint shape \(12, 9\) does not match the model's \(12, 8\)"
    ):
        row.weight_loader(param, LazyTensor.of(torch.zeros(12, 9), "q"))
