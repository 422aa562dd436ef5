"""tgi-llama is installed, registered through its entry point, and cheap to import."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys


def test_entry_point_is_declared() -> None:
    (entry_point,) = [
        ep for ep in importlib.metadata.distribution("tgi-llama").entry_points if ep.group == "tgi"
    ]
    assert (entry_point.name, entry_point.value) == ("llama", "tgi_llama")


def test_registers_the_llama_family(tgi_registry) -> None:
    spec = tgi_registry.models["llama"]
    for architecture in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"):
        assert tgi_registry.models.for_architecture(architecture) is spec
    assert spec.kind == "causal"
    assert {"causal", "paged_kv"} <= spec.requires
    assert tgi_registry.models.owner("llama").distribution == "tgi-llama"


def test_entry_module_does_not_import_torch() -> None:
    code = "import sys, tgi_llama; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
