"""tgi-bloom is installed, registered through its entry point, and cheap to import."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys


def test_entry_point_is_declared() -> None:
    (entry_point,) = [
        ep for ep in importlib.metadata.distribution("tgi-bloom").entry_points if ep.group == "tgi"
    ]
    assert (entry_point.name, entry_point.value) == ("bloom", "tgi_bloom")


def test_registers_bloom(tgi_registry) -> None:
    spec = tgi_registry.models["bloom"]
    assert tgi_registry.models.for_architecture("BloomForCausalLM") is spec
    assert tgi_registry.models.for_model_type("bloom") is spec
    assert spec.kind == "causal"
    assert spec.factory == "tgi_bloom.model:build_model"
    assert spec.requires == frozenset({"causal", "paged_kv", "alibi"})
    assert tgi_registry.models.owner("bloom").distribution == "tgi-bloom"


def test_entry_module_does_not_import_torch() -> None:
    code = "import sys, tgi_bloom; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
