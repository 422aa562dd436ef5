"""Tiny checkpoints for the tensor-parallel tests, and `tgi-core serve` processes.

Every checkpoint has 4 attention heads (so 2 ranks hold 2 each) and the 320-token
tokenizer of the shared ``tiny_llama``, copied into its folder.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def _with_tokenizer(path: Path, tiny_llama: Path) -> Path:
    for name in TOKENIZER_FILES:
        if (tiny_llama / name).exists():
            shutil.copy(tiny_llama / name, path / name)
    return path


def _save(root: Path, name: str, config: Any, tiny_llama: Path, **options: Any) -> Path:
    from tgi_core.model.fixtures import save_checkpoint

    return _with_tokenizer(save_checkpoint(root / name, config, **options), tiny_llama)


@pytest.fixture(scope="session")
def shard_checkpoints(
    tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path
) -> dict[str, Path]:
    """``llama-2kv`` (the shared tiny Llama: 4 heads, 2 KV heads, one per rank),
    ``llama-1kv`` (its KV head replicated on both ranks), ``bloom`` (ALiBi slopes per
    rank) and ``t5`` (v1.1: relative bias per rank, cross-attention, an untied head)."""
    from transformers import BloomConfig, LlamaConfig, T5Config

    root = tmp_path_factory.mktemp("shard-checkpoints")
    return {
        "llama-2kv": tiny_llama,
        "llama-1kv": _save(
            root,
            "llama-1kv",
            LlamaConfig(
                vocab_size=320,
                hidden_size=64,
                intermediate_size=96,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=1,
                max_position_embeddings=256,
                bos_token_id=0,
                eos_token_id=1,
                tie_word_embeddings=True,
            ),
            tiny_llama,
            seed=1,
        ),
        "bloom": _save(
            root,
            "bloom",
            BloomConfig(
                vocab_size=320, hidden_size=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=1
            ),
            tiny_llama,
            seed=2,
        ),
        "t5": _save(
            root,
            "t5",
            T5Config(
                vocab_size=320,
                d_model=64,
                d_kv=16,
                d_ff=96,
                num_layers=2,
                num_decoder_layers=2,
                num_heads=4,
                relative_attention_num_buckets=8,
                relative_attention_max_distance=20,
                feed_forward_proj="gated-gelu",
                tie_word_embeddings=False,
                decoder_start_token_id=0,
                pad_token_id=0,
                eos_token_id=1,
            ),
            tiny_llama,
            seed=3,
            weight_std=0.1,  # T5 scales no scores: keep its softmaxes from saturating
        ),
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def clean_environ(**extra: str) -> dict[str, str]:
    """The host's environment without what tgi or torch.distributed read, plus ``extra``."""
    from tgi_core.config import FIELDS

    names = {info.env for info in FIELDS.values() if info.env}
    names |= {"TGI_LOAD_PLUGINS", "TGI_CONFIG", "TGI_TRACE_PLUGINS", "OMP_NUM_THREADS"}
    names |= {
        "WORLD_SIZE",
        "RANK",
        "LOCAL_RANK",
        "LOCAL_WORLD_SIZE",
        "TORCHELASTIC_USE_AGENT_STORE",
    }
    environ = {key: value for key, value in os.environ.items() if key not in names}
    return {**environ, **extra}


class Rank:
    """One `tgi-core serve` process (a whole group's rank 0, or one rank of a launcher's)."""

    def __init__(self, command: list[str], log: Path, env: dict[str, str]) -> None:
        self.log = log
        with open(log, "w") as out:
            # a session of its own: teardown can kill it and every worker it started
            self.process = subprocess.Popen(
                command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def lines(self) -> list[dict[str, Any]]:
        """The JSON log lines written so far."""
        import json

        found = []
        for line in self.log.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    found.append(json.loads(line))
        return found

    def kill_all(self) -> None:
        """SIGKILL the process and everything it started (its session's process group)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)


def serve_command(model: Path, port: int, *options: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "tgi_core.cli",
        "serve",
        "--model-id",
        str(model),
        "--hostname",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-batch-total-tokens",
        "1024",
        "--dtype",
        "float32",
        "--json-output",
        *options,
    ]


def wait_healthy(base: str, ranks: list[Rank], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        for rank in ranks:
            assert rank.process.poll() is None, rank.log.read_text()
        assert time.monotonic() < deadline, "\n".join(r.log.read_text() for r in ranks)
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)


class ShardLab:
    """Starts `tgi-core serve` processes on free ports and always stops them: SIGTERM,
    then SIGKILL of each one's whole session (rank 0 and the workers it started)."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.started: list[Rank] = []

    def _rank(self, command: list[str], env: dict[str, str], name: str) -> Rank:
        rank = Rank(command, self.tmp_path / f"{name}-{len(self.started)}.log", env)
        self.started.append(rank)
        return rank

    def sharded(self, model: Path, *options: str, num_shard: int = 2) -> tuple[str, Rank]:
        """`tgi-core serve --num-shard N`, healthy: its URL and its rank 0."""
        port = free_port()
        command = serve_command(
            model, port, "--num-shard", str(num_shard), "--master-port", str(free_port()), *options
        )
        rank = self._rank(command, clean_environ(), "server")
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base, [rank])
        return base, rank

    def launched(self, models: tuple[Path, Path], *options: str) -> tuple[str, list[Rank]]:
        """Two `tgi-core serve` processes given the variables torchrun sets (not waited for)."""
        port, master = free_port(), free_port()
        ranks = []
        for rank, model in enumerate(models):
            env = clean_environ(
                WORLD_SIZE="2",
                RANK=str(rank),
                LOCAL_RANK=str(rank),
                LOCAL_WORLD_SIZE="2",
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(master),
            )
            command = serve_command(model, port, *options)
            ranks.append(self._rank(command, env, f"rank{rank}"))
        return f"http://127.0.0.1:{port}", ranks

    @staticmethod
    def wait_healthy(base: str, ranks: list[Rank]) -> None:
        wait_healthy(base, ranks)

    def torchrun(self, model: Path, *, nodes: int = 1) -> tuple[str, list[Rank]]:
        """torchrun processes serving ``model`` with 2 ranks (not waited for): with one
        node, ``--standalone --nproc-per-node 2``; with two, the two-node form of
        docs/sharding.md, both nodes on loopback. The ranks' output is torchrun's."""
        port, master = free_port(), free_port()
        serve = serve_command(model, port)[1:]  # without the interpreter
        launcher = [sys.executable, "-m", "torch.distributed.run"]
        if nodes == 1:
            commands = [[*launcher, "--standalone", "--nproc-per-node", "2", *serve]]
        else:
            commands = [
                [
                    *launcher,
                    *("--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(node)),
                    *("--master-addr", "127.0.0.1", "--master-port", str(master)),
                    *serve,
                ]
                for node in range(2)
            ]
        started = [self._rank(c, clean_environ(), "torchrun") for c in commands]
        return f"http://127.0.0.1:{port}", started

    def stop_all(self) -> None:
        for rank in self.started:
            if rank.process.poll() is None:
                rank.process.send_signal(signal.SIGTERM)
        for rank in self.started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                rank.process.wait(timeout=30)
            rank.kill_all()


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[ShardLab]:
    """A :class:`ShardLab`; whatever it started is stopped at teardown."""
    started = ShardLab(tmp_path)
    try:
        yield started
    finally:
        started.stop_all()
