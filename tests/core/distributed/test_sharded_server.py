"""`tgi-core serve --num-shard 2` as users run it: real processes, gloo, real HTTP.

The reference is the same server app with one shard, in-process; greedy tokens must be
equal and every logprob (generated, prompt, top-n) within 1e-4: the sharded model sums
its row-parallel products in another order, so float32 results differ by rounding only.
"""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from litestar.testing import TestClient

from tgi_core.model.base import ModelContext
from tgi_core.model.loader import load_model
from tgi_core.plugins import make_plugin_manager
from tgi_core.registry import Registry
from tgi_core.testing import build_test_app

pytestmark = pytest.mark.slow

PROMPTS = ["import os\n", "def main(args):\n    return", "class Config:", "x = [1, 2"]
#: What a rank of 2 may hold of the whole model (see test_shard_loading.py).
WEIGHT_SHARE = {"llama-2kv": 0.505, "llama-1kv": 0.53, "bloom": 0.51, "t5": 0.505}
TOLERANCE = 1e-4


def body(prompt: str) -> dict[str, Any]:
    return {
        "inputs": prompt,
        "parameters": {
            "max_new_tokens": 12,
            "details": True,
            "decoder_input_details": True,
            "top_n_tokens": 2,
        },
    }


#: Two greedy samples of one prompt: the second forks the first's blocks, and its first
#: write into their shared last block is a copy-on-write block copy (sent in the plan).
FORKED = {"model": "tgi", "prompt": "import os\n", "max_tokens": 8, "n": 2, "temperature": 0}


def reference_responses(model: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    app = build_test_app(
        str(model),
        max_batch_total_tokens="1024",
        dtype="float32",
        enable_prefill_logprobs="true",
    )
    with TestClient(app) as client:
        responses = []
        for prompt in PROMPTS:
            response = client.post("/generate", json=body(prompt))
            assert response.status_code == 200, response.text
            responses.append(response.json())
        forked = client.post("/v1/completions", json=FORKED)
        assert forked.status_code == 200, forked.text
        return responses, client.get("/info").json() | {"forked": forked.json()}


def sharded_responses(base: str) -> list[dict[str, Any]]:
    """All prompts at once, so that the sharded engine batches them."""

    def one(prompt: str) -> dict[str, Any]:
        response = httpx.post(f"{base}/generate", json=body(prompt), timeout=60)
        assert response.status_code == 200, response.text
        return dict(response.json())

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        return list(pool.map(one, PROMPTS))


def assert_same_generation(got: dict[str, Any], expected: dict[str, Any]) -> None:
    assert got["generated_text"] == expected["generated_text"]
    mine, theirs = got["details"], expected["details"]
    assert [t["id"] for t in mine["tokens"]] == [t["id"] for t in theirs["tokens"]]
    for ours, reference in zip(mine["tokens"], theirs["tokens"], strict=True):
        assert abs(ours["logprob"] - reference["logprob"]) <= TOLERANCE
    for ours, reference in zip(mine["prefill"], theirs["prefill"], strict=True):
        assert ours["id"] == reference["id"]
        if reference["logprob"] is not None:
            assert abs(ours["logprob"] - reference["logprob"]) <= TOLERANCE
    for ours, reference in zip(mine["top_tokens"], theirs["top_tokens"], strict=True):
        assert [t["id"] for t in ours] == [t["id"] for t in reference]
        for a, b in zip(ours, reference, strict=True):
            assert abs(a["logprob"] - b["logprob"]) <= TOLERANCE


def whole_weight_bytes(model: Path) -> int:
    registry = Registry.build(make_plugin_manager())
    return load_model(str(model), registry, ctx=ModelContext()).weight_bytes


@pytest.mark.parametrize("model", ["llama-2kv", "llama-1kv", "bloom", "t5"])
def test_two_shards_generate_what_one_does(
    shard_checkpoints: dict[str, Path], lab: Any, model: str
) -> None:
    path = shard_checkpoints[model]
    expected, expected_info = reference_responses(path)
    base, rank0 = lab.sharded(path, "--enable-prefill-logprobs")
    for got, want in zip(sharded_responses(base), expected, strict=True):
        assert_same_generation(got, want)
    forked = httpx.post(f"{base}/v1/completions", json=FORKED, timeout=60).json()
    texts = [choice["text"] for choice in forked["choices"]]
    assert texts == [choice["text"] for choice in expected_info["forked"]["choices"]]
    assert texts[0] == texts[1]
    info = httpx.get(f"{base}/info").json()
    assert (info["num_shard"], expected_info["num_shard"]) == (2, 1)
    # each rank measured its own weights and the bytes it read: about half the model
    whole = whole_weight_bytes(path)
    loaded = {line["rank"]: line for line in rank0.lines() if line["event"] == "shard loaded"}
    assert sorted(loaded) == [0, 1]
    for line in loaded.values():
        assert line["weight_bytes"] <= WEIGHT_SHARE[model] * whole
        assert line["bytes_read"] <= WEIGHT_SHARE[model] * whole


def pid_of_rank(rank0: Any, rank: int) -> int:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for line in rank0.lines():
            if line["event"] == "shard starting" and line["rank"] == rank:
                return int(line["pid"])
        time.sleep(0.1)
    raise AssertionError(rank0.log.read_text())


def gone(pid: int) -> bool:
    """Whether ``pid`` has exited (or is a zombie waiting to be reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            return file.read().split(")")[-1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def wait_unhealthy_then_exit(base: str, rank0: Any, timeout: float) -> list[str]:
    """The 503 bodies ``/health`` answered until the server exited (within ``timeout``)."""
    errors: list[str] = []
    deadline = time.monotonic() + timeout
    while rank0.process.poll() is None:
        assert time.monotonic() < deadline, rank0.log.read_text()
        try:
            response = httpx.get(f"{base}/health", timeout=2)
            if response.status_code == 503:
                errors.append(response.json()["error"])
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    return errors


def test_a_killed_rank_makes_the_server_unhealthy_and_exit(
    shard_checkpoints: dict[str, Path], lab: Any
) -> None:
    base, rank0 = lab.sharded(shard_checkpoints["llama-2kv"], "--shard-timeout", "10")
    worker = pid_of_rank(rank0, 1)
    with ThreadPoolExecutor(1) as pool:
        long = {"inputs": "import os\n", "parameters": {"max_new_tokens": 240}}
        in_flight = pool.submit(httpx.post, f"{base}/generate", json=long, timeout=60)
        time.sleep(0.3)
        os.kill(worker, signal.SIGKILL)
        killed = time.monotonic()
        errors = wait_unhealthy_then_exit(base, rank0, timeout=30)
        response = in_flight.result()
    assert time.monotonic() - killed < 30
    assert rank0.process.returncode == 1
    assert errors and all("rank 1" in error and "SIGKILL" in error for error in errors)
    if response.status_code != 200:  # it was still generating when the rank died
        assert "tensor-parallel group has failed" in response.json()["error"]
    failures = [line for line in rank0.lines() if line["event"] == "tensor-parallel group failed"]
    assert [(line["rank"], line["reason"]) for line in failures] == [
        (1, "the process exited (killed by SIGKILL)")
    ]
    assert "Error: the tensor-parallel group failed: rank 1" in rank0.log.read_text()


def test_a_hung_rank_is_found_by_its_silence(shard_checkpoints: dict[str, Path], lab: Any) -> None:
    base, rank0 = lab.sharded(shard_checkpoints["llama-2kv"], "--shard-timeout", "2")
    worker = pid_of_rank(rank0, 1)
    os.kill(worker, signal.SIGSTOP)
    try:
        stopped = time.monotonic()
        errors = wait_unhealthy_then_exit(base, rank0, timeout=40)
        assert time.monotonic() - stopped >= 2  # not before the shard timeout
        assert rank0.process.returncode == 1
        assert errors and "rank 1: no heartbeat for" in errors[0]
        deadline = time.monotonic() + 20
        while not gone(worker):  # rank 0 killed the hung worker on its way out
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        if not gone(worker):
            os.kill(worker, signal.SIGKILL)


@pytest.mark.parametrize("target", ["rank 0", "rank 1"])
def test_sigterm_to_any_rank_stops_the_whole_group(
    shard_checkpoints: dict[str, Path], lab: Any, target: str
) -> None:
    base, rank0 = lab.sharded(shard_checkpoints["llama-2kv"])
    worker = pid_of_rank(rank0, 1)
    assert httpx.post(f"{base}/generate", json=body("import os\n")).status_code == 200
    os.kill(rank0.process.pid if target == "rank 0" else worker, signal.SIGTERM)
    # uvicorn re-raises the SIGTERM it caught once it has shut down gracefully
    assert rank0.process.wait(timeout=60) in (0, -signal.SIGTERM)
    deadline = time.monotonic() + 10
    while not gone(worker):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    events = [(line["event"], line.get("rank"), line.get("failure")) for line in rank0.lines()]
    assert ("shard stopped", 1, None) in events
    assert ("tensor-parallel group stopped", None, None) in events


def test_ranks_started_by_a_launcher_form_one_server(
    shard_checkpoints: dict[str, Path], lab: Any
) -> None:
    """The multi-node path on one machine: WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR and
    MASTER_PORT, as torchrun sets them on each node, and the same command."""
    model = shard_checkpoints["llama-2kv"]
    expected, _ = reference_responses(model)
    base, ranks = lab.launched((model, model), "--enable-prefill-logprobs")
    lab.wait_healthy(base, ranks)
    assert httpx.get(f"{base}/info").json()["num_shard"] == 2
    for got, want in zip(sharded_responses(base), expected, strict=True):
        assert_same_generation(got, want)
    ranks[0].process.send_signal(signal.SIGTERM)
    assert ranks[0].process.wait(timeout=60) in (0, -signal.SIGTERM)
    assert ranks[1].process.wait(timeout=30) == 0
    assert any(line["event"] == "shard stopped" for line in ranks[1].lines())


def test_a_rank_that_cannot_start_stops_the_group(
    shard_checkpoints: dict[str, Path], lab: Any, tmp_path: Path
) -> None:
    model = shard_checkpoints["llama-2kv"]
    _, ranks = lab.launched((model, tmp_path / "missing"))
    assert ranks[0].process.wait(timeout=120) == 1
    assert ranks[1].process.wait(timeout=30) == 1
    output = ranks[0].log.read_text()
    assert "Error: rank 1 failed while loading its shard: CheckpointError: model folder" in output


@pytest.mark.parametrize("nodes", [1, 2])
def test_the_same_command_under_torchrun(
    shard_checkpoints: dict[str, Path], lab: Any, nodes: int
) -> None:
    """torchrun's own rendezvous (its agent hosts the store and says so with
    TORCHELASTIC_USE_AGENT_STORE), on one node or on two; on SIGTERM torchrun signals
    its ranks and the group stops gracefully (torchrun then exits 1 on its own account:
    it reports the signal it got)."""
    base, launchers = lab.torchrun(shard_checkpoints["llama-2kv"], nodes=nodes)
    lab.wait_healthy(base, launchers)
    assert httpx.get(f"{base}/info").json()["num_shard"] == 2
    response = httpx.post(f"{base}/generate", json=body("import os\n"), timeout=60)
    assert response.status_code == 200
    for launcher in launchers:
        launcher.process.send_signal(signal.SIGTERM)
    for launcher in launchers:
        launcher.process.wait(timeout=60)
    lines = [line for launcher in launchers for line in launcher.lines()]
    events = [(line["event"], line.get("rank"), line.get("failure")) for line in lines]
    assert ("shard stopped", 1, None) in events
    assert ("tensor-parallel group stopped", None, None) in events
