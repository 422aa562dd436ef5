"""Loading Hugging Face checkpoint folders: what works, and one test per error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig

from tgi_core.attention.selection import select_backend
from tgi_core.errors import ConfigError
from tgi_core.model.base import ModelContext
from tgi_core.model.checkpoint import Checkpoint, CheckpointError
from tgi_core.model.convert import convert_checkpoint
from tgi_core.model.fixtures import compare_with_transformers, save_checkpoint
from tgi_core.model.loader import load_model
from tgi_core.model.parallel import ParallelContext
from tgi_core.plugins import make_plugin_manager
from tgi_core.registry import Registry
from tgi_core.specs import AttentionBackendSpec, ModelSpec

CONFIG = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15, 16, 17]]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "llama", LlamaConfig(**CONFIG))


@pytest.fixture
def copy(llama_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(llama_dir, target)
    return target


def load(path: Path, registry, **ctx):
    return load_model(str(path), registry, ctx=ModelContext(**ctx))


def test_loads_and_reads_generation_config(llama_dir: Path, tgi_registry) -> None:
    loaded = load(llama_dir, tgi_registry)
    assert loaded.spec.name == "llama" and loaded.checkpoint.generation_config is not None
    assert type(loaded.model).__name__ == "LlamaForCausalLM"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dtype_converts_every_parameter(llama_dir: Path, tgi_registry, dtype) -> None:
    model = load(llama_dir, tgi_registry, dtype=dtype).model
    assert {p.dtype for p in model.parameters()} == {dtype}


def test_sharded_checkpoint(llama_dir: Path, tmp_path: Path, tgi_registry) -> None:
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(llama_dir).save_pretrained(sharded, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("model-*.safetensors"))) > 2
    result = compare_with_transformers(sharded, PROMPTS, decode_steps=4)
    assert result.max_abs_diff <= 1e-4


def test_tied_checkpoint_saving_both_names(tmp_path: Path, tgi_registry) -> None:
    tied = save_checkpoint(tmp_path / "tied", LlamaConfig(**CONFIG, tie_word_embeddings=True))
    tensors = load_file(tied / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, tied / "model.safetensors")
    model = load(tied, tgi_registry).model
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_tensor_parallel_ranks_read_their_slices(llama_dir: Path, tgi_registry) -> None:
    full = load_file(llama_dir / "model.safetensors")
    for rank in range(2):
        model = load(llama_dir, tgi_registry, tp=ParallelContext(rank=rank, world_size=2)).model
        attention = model.model.layers[0].self_attn
        q_rows = attention.qkv_proj.q_size
        expected_q = full["model.layers.0.self_attn.q_proj.weight"].chunk(2)[rank]
        assert torch.equal(attention.qkv_proj.weight[:q_rows], expected_q)
        expected_o = full["model.layers.0.self_attn.o_proj.weight"].chunk(2, dim=1)[rank]
        assert torch.equal(attention.o_proj.weight, expected_o)
        per_rank = sum(p.numel() for p in model.parameters())
        assert per_rank < 0.7 * sum(t.numel() for t in full.values())


# -- errors, one test each ---------------------------------------------------------------


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(
        CheckpointError,
        match=r"model folder .*nope does not exist; tgi-core "
        r"serves checkpoint folders",
    ):
        Checkpoint.open(tmp_path / "nope")


def test_a_file_instead_of_a_folder(llama_dir: Path) -> None:
    with pytest.raises(CheckpointError, match="is not a folder"):
        Checkpoint.open(llama_dir / "config.json")


def test_missing_config(copy: Path) -> None:
    (copy / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"has no config\.json"):
        Checkpoint.open(copy)


def test_invalid_config_json(copy: Path) -> None:
    (copy / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config.json is not valid JSON"):
        Checkpoint.open(copy)


def test_pickle_weights_point_to_convert(copy: Path, tgi_registry) -> None:
    state = load_file(copy / "model.safetensors")
    (copy / "model.safetensors").unlink()
    torch.save(state, copy / "pytorch_model.bin")
    with pytest.raises(
        CheckpointError,
        match=r"holds PyTorch pickle weights \(pytorch_model.bin"
        r"\), which tgi-core never loads implicitly.*"
        r"tgi-core convert ",
    ):
        Checkpoint.open(copy)
    written = convert_checkpoint(copy)
    assert written == [copy / "model.safetensors"]
    assert load(copy, tgi_registry).spec.name == "llama"


def test_convert_refuses_pickled_code(tmp_path: Path) -> None:
    torch.save({"weights": torch.zeros(2), "hook": ConnectionError}, tmp_path / "evil.bin")
    with pytest.raises(CheckpointError, match="cannot be read safely"):
        convert_checkpoint(tmp_path)


def test_no_weights(copy: Path) -> None:
    (copy / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"has no weights: expected model\.safetensors"):
        Checkpoint.open(copy)


def test_index_names_a_missing_shard(copy: Path) -> None:
    index = {
        "weight_map": {
            "a": "model-00001-of-00002.safetensors",
            "b": "model-00002-of-00002.safetensors",
        }
    }
    (copy / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(
        CheckpointError,
        match=r"names shard\(s\) that .* lacks: "
        r"model-00001-of-00002",
    ):
        Checkpoint.open(copy)


def test_missing_tensors_are_named(copy: Path, tgi_registry) -> None:
    tensors = load_file(copy / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"], tensors["model.norm.weight"]
    save_file(tensors, copy / "model.safetensors")
    with pytest.raises(
        CheckpointError,
        match=r"lacks tensors the model needs: "
        r"model.layers.1.mlp.gate_up_proj.weight \(1\), "
        r"model.norm.weight",
    ):
        load(copy, tgi_registry)


def test_unexpected_tensors_are_named(copy: Path, tgi_registry) -> None:
    tensors = load_file(copy / "model.safetensors")
    tensors["model.layers.0.mystery.weight"] = torch.zeros(2)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(2)  # ignored
    save_file(tensors, copy / "model.safetensors")
    with pytest.raises(
        CheckpointError,
        match=r"has tensors the model does not: "
        r"model.layers.0.mystery.weight$",
    ):
        load(copy, tgi_registry)


def test_shape_mismatch_is_named(copy: Path, tgi_registry) -> None:
    config = json.loads((copy / "config.json").read_text())
    config["intermediate_size"] = 40
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        CheckpointError,
        match=r"cannot load tensor model.layers.0.mlp.\w+_proj"
        r".weight: checkpoint shape",
    ):
        load(copy, tgi_registry)


def test_corrupt_weights_file(copy: Path, tgi_registry) -> None:
    (copy / "model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match="cannot read the weights of"):
        load(copy, tgi_registry)


@pytest.mark.parametrize(
    ("architectures", "expected"),
    [
        (
            ["T5ForConditionalGeneration"],
            r"no installed plugin serves T5ForConditionalGeneration"
            r" .*; install tgi-t5 \(pip install tgi-t5\)\. "
            r"Architectures served: .*LlamaForCausalLM",
        ),
        (
            ["FooForCausalLM"],
            r"no installed plugin serves FooForCausalLM .*config.json\)\. "
            r"Architectures served: ",
        ),
    ],
)
def test_architecture_nobody_serves(copy: Path, architectures, expected) -> None:
    config = json.loads((copy / "config.json").read_text())
    config["architectures"], config["model_type"] = architectures, "foo"
    (copy / "config.json").write_text(json.dumps(config))
    # as if tgi-t5 were not installed: only the Llama and BLOOM plugins are loaded
    without_t5 = Registry.build(make_plugin_manager(environ={"TGI_LOAD_PLUGINS": "llama,bloom"}))
    with pytest.raises(CheckpointError, match=expected):
        load(copy, without_t5)


def test_model_type_is_used_without_architectures(copy: Path, tgi_registry) -> None:
    config = json.loads((copy / "config.json").read_text())
    del config["architectures"]
    (copy / "config.json").write_text(json.dumps(config))
    assert load(copy, tgi_registry).spec.name == "llama"


def test_backend_that_lacks_a_feature_is_refused(tgi_registry_with) -> None:
    import tgi_core

    class NeedsRelativeBias:
        @tgi_core.hookimpl
        def register_models(self, register):
            register(
                ModelSpec(
                    name="needy",
                    architectures=("NeedyLM",),
                    factory="os:getcwd",
                    requires=frozenset({"causal", "relative_bias"}),
                )
            )

        @tgi_core.hookimpl
        def register_attention_backends(self, register):
            register(
                AttentionBackendSpec(
                    name="minimal",
                    factory="os:getcwd",
                    features=frozenset({"causal", "paged_kv"}),
                    priority=100,
                )
            )

    registry = tgi_registry_with(NeedsRelativeBias())
    spec = registry.models["needy"]
    with pytest.raises(
        ConfigError,
        match=r"attention backend 'minimal' \(local\) cannot serve "
        r"model 'needy' \(local\): it lacks relative_bias",
    ):
        select_backend(spec, registry, "minimal")
    # by default, the best backend that has every feature the model needs
    assert select_backend(spec, registry).name == "sdpa"
    # ... and for a model that needs less, the highest priority one
    assert select_backend(registry.models["llama"], registry).name == "minimal"
    assert select_backend(registry.models["llama"], registry, "reference").name == "reference"


def test_tied_config_with_a_different_stored_head_is_untied(tmp_path: Path) -> None:
    """transformers gives the head its own weights when the file stores different ones."""
    tied = save_checkpoint(tmp_path / "tied", LlamaConfig(**CONFIG, tie_word_embeddings=True))
    tensors = load_file(tied / "model.safetensors")
    tensors["lm_head.weight"] = torch.randn_like(tensors["model.embed_tokens.weight"])
    save_file(tensors, tied / "model.safetensors")
    assert compare_with_transformers(tied, PROMPTS, decode_steps=4).max_abs_diff <= 1e-4


def test_unserved_architecture_does_not_fall_back_to_model_type(copy: Path, tgi_registry):
    config = json.loads((copy / "config.json").read_text())
    config["architectures"] = ["LlamaForSequenceClassification"]  # model_type stays llama
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        CheckpointError, match="no installed plugin serves LlamaForSequenceClassification"
    ):
        load(copy, tgi_registry)


def test_a_config_the_model_cannot_build_is_a_checkpoint_error(copy: Path, tgi_registry):
    config = json.loads((copy / "config.json").read_text())
    config["hidden_act"] = "gelu_fast"
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        CheckpointError,
        match=r"model 'llama' cannot be built for .*"
        r"unsupported activation 'gelu_fast'",
    ):
        load(copy, tgi_registry)


def test_an_invalid_config_is_a_checkpoint_error(copy: Path, tgi_registry):
    config = json.loads((copy / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0}
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"is not a valid llama config"):
        load(copy, tgi_registry)


def test_a_built_model_needs_what_its_layers_use(tgi_registry_with, tmp_path: Path) -> None:
    import tgi_core
    from tgi_core.attention.selection import required_features
    from tgi_core.specs import AttentionBackendSpec

    class NoWindows:
        @tgi_core.hookimpl
        def register_attention_backends(self, register):
            register(
                AttentionBackendSpec(
                    name="nowindow",
                    factory="os:getcwd",
                    priority=99,
                    features=frozenset({"causal", "paged_kv", "gqa"}),
                )
            )

    from transformers import MistralConfig

    mistral = save_checkpoint(tmp_path / "mistral", MistralConfig(**CONFIG, sliding_window=4))
    registry = tgi_registry_with(NoWindows())
    loaded = load(mistral, registry)
    needs = required_features(loaded.model)
    assert needs == {"causal", "paged_kv", "gqa", "sliding_window"}
    with pytest.raises(
        ConfigError,
        match=r"'nowindow' .* cannot serve model 'llama' "
        r"\(tgi-llama\): it lacks sliding_window",
    ):
        select_backend(loaded.spec, registry, "nowindow", needs=needs)
    assert select_backend(loaded.spec, registry, needs=needs).name == "sdpa"
