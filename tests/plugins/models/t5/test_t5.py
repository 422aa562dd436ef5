"""tgi-t5 against transformers on T5 v1.0 and v1.1 checkpoints it saved itself: encoder
outputs and decoder logits of packed batches, greedy generation through the engine and
the server, preemption, and cancellation freeing self- and cross-attention memory."""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

import pytest
import torch
from litestar.testing import TestClient
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, T5Config

from tgi_core.attention.batch import ForwardBatch, SequenceChunk
from tgi_core.engine.requests import GenerateRequest, StoppingParams
from tgi_core.model.base import ModelContext
from tgi_core.model.fixtures import build_engine, save_checkpoint, train_tokenizer
from tgi_core.model.loader import load_model
from tgi_core.model.runner import PagedRunner
from tgi_core.plugins import make_plugin_manager
from tgi_core.registry import Registry
from tgi_core.testing import build_test_app

VERSIONS = {
    # v1.0: ReLU, the head tied to the embedding, the decoder output scaled
    "v1.0": {"feed_forward_proj": "relu"},
    # v1.1 / flan-t5: gated GELU, an untied head
    "v1.1": {"feed_forward_proj": "gated-gelu", "tie_word_embeddings": False},
}
SOURCES = [list(range(3, 3 + n)) for n in (7, 40, 3, 18)]


def t5_config(**overrides) -> T5Config:
    values = dict(
        vocab_size=320,
        d_model=64,
        d_kv=16,
        d_ff=96,
        num_layers=2,
        num_decoder_layers=3,  # the decoder deeper than the encoder
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=20,  # sources longer than this use log buckets
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5Config(**(values | overrides))


@pytest.fixture(scope="module", params=sorted(VERSIONS))
def checkpoint(request, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp(f"t5-{request.param}") / "t5"
    # T5 does not scale its attention scores: with the fixtures' usual 0.2 weights the
    # softmaxes saturate and any rounding difference (SDPA's vs eager's) grows past 1e-4
    save_checkpoint(path, t5_config(**VERSIONS[request.param]), weight_std=0.1)
    train_tokenizer(path, 320)
    return path


@pytest.fixture(scope="module")
def reference(checkpoint: Path):
    return AutoModelForSeq2SeqLM.from_pretrained(
        str(checkpoint), attn_implementation="eager"
    ).eval()


def reference_generate(model, source: list[int], max_new: int) -> list[int]:
    """transformers' greedy tokens (without the start token). Its cache mishandles a
    decoder deeper than the encoder in generate (transformers 5.24), so: no cache."""
    out = model.generate(
        torch.tensor([source]), max_new_tokens=max_new, do_sample=False, use_cache=False
    )
    return out[0, 1:].tolist()


def loaded_model(checkpoint: Path):
    registry = Registry.build(make_plugin_manager())
    return load_model(str(checkpoint), registry, ctx=ModelContext(dtype=torch.float32))


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
def test_encoder_outputs_and_decoder_logits_match(checkpoint, reference, backend) -> None:
    loaded = loaded_model(checkpoint)
    impl = Registry.build(make_plugin_manager()).attention_backends[backend].load()()
    runner = PagedRunner(loaded.model, impl, num_blocks=128, block_size=4)
    # encoder: every source packed into one step
    ids = [runner.add([0], source) for source in SOURCES]
    chunks = []
    for seq_id, source in zip(ids, SOURCES, strict=True):
        runner._reserve(runner.sequences[seq_id], len(source))
        blocks = runner.sequences[seq_id].blocks
        chunks.append(SequenceChunk(0, 1, list(blocks), len(source), source))
    batch = ForwardBatch.build(chunks, runner.kv_cache, impl)
    with torch.inference_mode():
        encoded = loaded.model.encoder(batch.encoder.input_ids, batch)
        for n, source in enumerate(SOURCES):
            theirs = reference.encoder(input_ids=torch.tensor([source])).last_hidden_state[0]
            start, end = batch.encoder.query_start[n], batch.encoder.query_start[n + 1]
            assert (encoded[start:end] - theirs).abs().max().item() <= 1e-4
    # decoder: 16 greedy steps of the whole packed batch through the paged cache
    tokens = {seq_id: [0] for seq_id in ids}
    steps: dict[int, list[torch.Tensor]] = {seq_id: [] for seq_id in ids}
    for _ in range(16):
        for seq_id, logits in zip(ids, runner.step(ids), strict=True):
            steps[seq_id].append(logits)
            tokens[seq_id].append(int(logits.argmax()))
            runner.append(seq_id, [tokens[seq_id][-1]])
    worst = 0.0
    with torch.inference_mode():
        for seq_id, source in zip(ids, SOURCES, strict=True):
            theirs = reference(
                input_ids=torch.tensor([source]),
                decoder_input_ids=torch.tensor([tokens[seq_id][:-1]]),
                use_cache=False,
            ).logits[0]
            ours = torch.stack(steps[seq_id])
            worst = max(worst, (ours - theirs).abs().max().item())
    assert worst <= 1e-4, worst
    for seq_id, source in zip(ids, SOURCES, strict=True):
        ours = tokens[seq_id][1:]
        ours = ours[: ours.index(1) + 1] if 1 in ours else ours  # transformers stops at EOS
        assert ours == reference_generate(reference, source, 16)


def greedy(source: list[int], max_new: int) -> GenerateRequest:
    return GenerateRequest(
        request_id=f"r{len(source)}-{source[0]}",
        prompt_token_ids=tuple(source),
        stopping=StoppingParams(max_new_tokens=max_new),
    )


def tokens_of(events) -> list[int]:
    return [e.token_id for e in events if e.error is None]


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_engine_matches_transformers_in_mixed_batches(checkpoint, reference, compile) -> None:
    engine = build_engine(
        checkpoint, num_blocks=256, block_size=4, decoder_start_token_id=0, compile=compile
    )
    encodes = []
    engine.runner.model.encoder.register_forward_hook(
        lambda module, args, out: encodes.append(out.shape[0])
    )
    sources = [list(range(4 + i, 4 + i + 5 * (i + 1))) for i in range(6)]
    requests = [greedy(s, 12) for s in sources]
    streams = {r.request_id: [] for r in requests}
    # requests arrive while others are decoding: admissions and decodes share steps
    for request in requests:
        engine.add_request(request)
        for event in engine.step():
            streams[event.request_id].append(event)
    while engine.has_work():
        for event in engine.step():
            streams[event.request_id].append(event)
    for request, source in zip(requests, sources, strict=True):
        assert tokens_of(streams[request.request_id]) == reference_generate(reference, source, 12)
    assert sum(encodes) == sum(len(s) for s in sources)  # each source encoded once
    assert engine.blocks.num_used == 0


def test_preemption_keeps_outputs_equal(checkpoint, reference) -> None:
    # 20 blocks of 4 tokens: four requests needing 10 blocks each cannot all run at once
    engine = build_engine(checkpoint, num_blocks=20, block_size=4, decoder_start_token_id=0)
    sources = [list(range(10 + i, 10 + i + 12)) for i in range(4)]
    requests = [greedy(s, 36) for s in sources]
    streams = engine.run(requests)
    assert engine.scheduler.num_preemptions > 0
    for request, source in zip(requests, sources, strict=True):
        assert tokens_of(streams[request.request_id]) == reference_generate(reference, source, 36)
    engine.blocks.check()
    assert engine.blocks.num_used == 0


def test_cancelled_requests_free_self_and_cross_attention_blocks(checkpoint) -> None:
    engine = build_engine(checkpoint, num_blocks=64, block_size=4, decoder_start_token_id=0)
    for i, length in enumerate((30, 9, 17)):
        engine.add_request(greedy(list(range(5 + i, 5 + i + length)), 40))
    for _ in range(3):
        engine.step()
    # each holds blocks for the longer of its source and its decoder tokens
    held = {
        seq.request_id: len(seq.block_table) for seqs in engine.sequences.values() for seq in seqs
    }
    assert held == {"r30-5": 8, "r9-6": 3, "r17-7": 5}
    for request_id in list(engine.sequences):
        engine.abort(request_id)
    engine.step()
    assert engine.blocks.num_used == 0
    engine.blocks.check()


def test_served_concurrently_over_http(checkpoint, reference) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    app = build_test_app(
        str(checkpoint),
        {"TGI_LOAD_PLUGINS": "tgi-t5"},
        max_batch_total_tokens="4096",
        dtype="float32",
    )
    prompts = [f"def f{i}(x):\n    return x * {i}" + " + 1" * i for i in range(8)]
    with TestClient(app) as client:
        info = client.get("/info").json()
        assert info["is_encoder_decoder"] is True
        assert info["model_pipeline_tag"] == "text2text-generation"

        def generate(prompt: str) -> dict:
            body = {"inputs": prompt, "parameters": {"max_new_tokens": 10, "details": True}}
            response = client.post("/generate", json=body)
            assert response.status_code == 200, response.text
            return response.json()

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            results = list(pool.map(generate, prompts))
        for prompt, result in zip(prompts, results, strict=True):
            expected = reference_generate(reference, tokenizer.encode(prompt), 10)
            assert [t["id"] for t in result["details"]["tokens"]] == expected
            assert result["generated_text"] == tokenizer.decode(expected, skip_special_tokens=True)
        compat = client.post("/", json={"inputs": prompts[0], "parameters": {"max_new_tokens": 3}})
        assert not compat.json()[0]["generated_text"].startswith(prompts[0])  # text2text
        chat = client.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}
        )
        assert chat.status_code == 422 and "template" in chat.json()["error"]["message"]
        completion = client.post(
            "/v1/completions", json={"prompt": prompts[1], "max_tokens": 5, "temperature": 0}
        ).json()
        expected = reference_generate(reference, tokenizer.encode(prompts[1]), 5)
        assert completion["choices"][0]["text"] == tokenizer.decode(
            expected, skip_special_tokens=True
        )
        assert completion["usage"]["prompt_tokens"] == len(tokenizer.encode(prompts[1]))


def test_bfloat16_cross_attention_through_the_decode_kernel(checkpoint, monkeypatch) -> None:
    """In bf16, decode steps read the sources' keys and values in place with the decode
    kernel (T5's cross-attention has no position bias); the logits stay within bf16
    rounding of the gather + SDPA path's, on the same tokens: within 5% of the largest
    logit (bf16 rounding through 3 decoder layers and 8 steps measured 0.9-1.4%; a wrong
    source row or length moves logits by their own size)."""
    import tgi_core.attention.sdpa as sdpa
    from tgi_core.attention import native

    if not native.paged_decode_available():
        pytest.skip("no C++ compiler to build the decode kernel")
    registry = Registry.build(make_plugin_manager())
    loaded = load_model(str(checkpoint), registry, ctx=ModelContext(dtype=torch.bfloat16))
    backend = registry.attention_backends["sdpa"].load()()

    def decode(tokens: dict[int, list[int]] | None) -> tuple[dict[int, list[int]], torch.Tensor]:
        runner = PagedRunner(
            loaded.model, backend, num_blocks=128, block_size=4, model_dtype=torch.bfloat16
        )
        ids = [runner.add([0], source) for source in SOURCES]
        chosen = {seq_id: [0] for seq_id in ids} if tokens is None else tokens
        logits = []
        for step in range(8):
            outs = runner.step(ids)
            logits.append(torch.stack(outs))
            for seq_id, out in zip(ids, outs, strict=True):
                if tokens is None:
                    chosen[seq_id].append(int(out.argmax()))
                runner.append(seq_id, [chosen[seq_id][step + 1]])
        return chosen, torch.stack(logits)

    with monkeypatch.context() as patch:
        patch.setattr(sdpa, "paged_decode_available", lambda: False)
        tokens, gathered = decode(None)
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return native.paged_decode(*args, **kwargs)

    monkeypatch.setattr(sdpa, "paged_decode", counted)
    _, in_place = decode(tokens)
    assert calls  # the decode steps' cross-attention went through the kernel
    assert (in_place - gathered).abs().max() <= 0.05 * gathered.abs().max()


def test_bfloat16_encoder_through_the_prefill_kernel(checkpoint, reference, monkeypatch) -> None:
    """In bf16 on a CPU without AMX, the encoder's bidirectional attention with its
    relative position bias runs on the prefill kernel, every source of the step in one
    call per layer; its outputs stay within bf16 rounding of SDPA's on the same bf16
    model, and of transformers' float32 encoder: within 3% and 5% of the largest output
    (measured 0.9-1.4% and 1.6-3.0%: bf16 through 2 layers; a wrong bias or source
    length moves outputs by their own size)."""
    import tgi_core.attention.sdpa as sdpa
    from tgi_core.attention import flash_prefill

    if not flash_prefill.flash_prefill_available(16):
        pytest.skip("needs AVX-512 BF16 and a C++ compiler for the prefill kernel")
    monkeypatch.setattr(sdpa, "_has_amx", lambda: False)  # the path CPUs without AMX take
    registry = Registry.build(make_plugin_manager())
    loaded = load_model(str(checkpoint), registry, ctx=ModelContext(dtype=torch.bfloat16))
    backend = registry.attention_backends["sdpa"].load()()

    def encode() -> torch.Tensor:
        runner = PagedRunner(
            loaded.model, backend, num_blocks=128, block_size=4, model_dtype=torch.bfloat16
        )
        chunks = []
        for source in SOURCES:
            seq_id = runner.add([0], source)
            runner._reserve(runner.sequences[seq_id], len(source))
            blocks = runner.sequences[seq_id].blocks
            chunks.append(SequenceChunk(0, 1, list(blocks), len(source), source))
        batch = ForwardBatch.build(chunks, runner.kv_cache, backend)
        with torch.inference_mode():
            return loaded.model.encoder(batch.encoder.input_ids, batch).float()

    with monkeypatch.context() as patch:
        patch.setattr(sdpa, "flash_prefill_available", lambda head_dim: False)
        through_sdpa = encode()
    calls = []
    attend = flash_prefill.PrefillSequences.attend

    def counted(self, *args, **kwargs):
        calls.append(self._q_len.tolist())
        return attend(self, *args, **kwargs)

    monkeypatch.setattr(flash_prefill.PrefillSequences, "attend", counted)
    through_kernel = encode()
    assert calls == [[len(source) for source in SOURCES]] * 2  # one call per encoder layer
    largest = through_sdpa.abs().max()
    assert (through_kernel - through_sdpa).abs().max() <= 0.03 * largest
    with torch.inference_mode():
        theirs = torch.cat(
            [reference.encoder(input_ids=torch.tensor([s])).last_hidden_state[0] for s in SOURCES]
        )
    assert (through_kernel - theirs).abs().max() <= 0.05 * largest
