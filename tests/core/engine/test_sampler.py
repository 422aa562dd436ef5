"""The sampler's processors equal transformers' logits processors, row by row."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from tgi_core.engine.requests import SamplingParams
from tgi_core.engine.sampler import _penalties, _warp, is_sampling, sample

torch.manual_seed(0)
V = 50


#: greedy, seeded sampling and a penalty, each with top-n log-probabilities
TOP_N_CASES = [
    SamplingParams(top_n_tokens=4),
    SamplingParams(do_sample=True, seed=3, top_n_tokens=2),
    SamplingParams(repetition_penalty=1.3, top_n_tokens=3),
]


def finite(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isinf(x) | (x < -1e30), torch.full_like(x, -1e9), x)


@pytest.mark.parametrize(
    ("params", "processor"),
    [
        (SamplingParams(temperature=0.7), TemperatureLogitsWarper(0.7)),
        (SamplingParams(top_k=5), TopKLogitsWarper(5)),
        (SamplingParams(top_p=0.8), TopPLogitsWarper(0.8)),
        (SamplingParams(typical_p=0.6), TypicalLogitsWarper(0.6)),
        (SamplingParams(min_p=0.1), MinPLogitsWarper(0.1)),
    ],
)
def test_each_warper_matches_transformers(params, processor) -> None:
    logits = torch.randn(3, V) * 3
    ours = _warp(logits.clone(), [params] * 3)
    theirs = processor(None, logits.clone())
    assert torch.equal(ours > -1e30, theirs > -1e30)  # the same tokens survive
    torch.testing.assert_close(finite(ours), finite(theirs))


def test_rows_keep_their_own_settings() -> None:
    logits = torch.randn(3, V) * 3
    rows = [SamplingParams(top_k=3), SamplingParams(top_p=0.5), SamplingParams(temperature=2.0)]
    ours = _warp(logits.clone(), rows)
    assert (ours[0] > -1e30).sum() == 3
    torch.testing.assert_close(finite(ours[1:2]), finite(TopPLogitsWarper(0.5)(None, logits[1:2])))
    torch.testing.assert_close(ours[2], logits[2] / 2.0)


def test_repetition_penalty_is_ctrl_style_like_transformers() -> None:
    logits, history = torch.randn(1, V) * 3, [3, 7, 7, 20]
    ours = _penalties(logits.clone(), [SamplingParams(repetition_penalty=1.3)], [history])
    theirs = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([history]), logits.clone())
    torch.testing.assert_close(ours, theirs)


def test_frequency_and_presence_penalties() -> None:
    logits, history = torch.zeros(2, V), [3, 7, 7, 20]
    rows = [
        SamplingParams(frequency_penalty=0.5),  # TGI: penalty * count / length
        SamplingParams(frequency_penalty=0.5, presence_penalty=0.25, penalty_style="openai"),
    ]  # OpenAI: raw count, plus presence
    out = _penalties(logits, rows, [history, history])
    assert out[0, 7].item() == pytest.approx(-0.5 * 2 / 4)
    assert out[0, 3].item() == pytest.approx(-0.5 * 1 / 4) and out[0, 4].item() == 0
    assert out[1, 7].item() == pytest.approx(-0.5 * 2 - 0.25)
    assert out[1, 20].item() == pytest.approx(-0.5 - 0.25)


def test_greedy_unless_sampling_and_logprobs_top_n() -> None:
    assert not is_sampling(SamplingParams())
    assert is_sampling(SamplingParams(do_sample=True))
    assert is_sampling(SamplingParams(top_k=3))  # TGI: a warper turns sampling on
    assert not is_sampling(SamplingParams(do_sample=True, temperature=0))
    logits = torch.randn(2, V)
    out = sample(
        logits, [SamplingParams(top_n_tokens=3), SamplingParams()], [[1], [2]], [None, None]
    )
    assert out.token_ids == logits.argmax(-1).tolist()
    log_probs = logits.log_softmax(-1)
    assert out.logprobs[0] == pytest.approx(log_probs[0].max().item())
    assert out.top_ids[0] == log_probs[0].topk(3).indices.tolist()
    assert out.top_ids[1] == []


def test_seeded_sampling_is_reproducible_and_follows_the_distribution() -> None:
    probs = torch.tensor([0.7, 0.2, 0.1])
    logits = probs.log()[None].repeat(4000, 1)
    params = [SamplingParams(do_sample=True)] * 4000
    first = sample(
        logits, params, [[0]] * 4000, [torch.Generator().manual_seed(i) for i in range(4000)]
    )
    again = sample(
        logits, params, [[0]] * 4000, [torch.Generator().manual_seed(i) for i in range(4000)]
    )
    assert first.token_ids == again.token_ids
    frequencies = torch.bincount(torch.tensor(first.token_ids), minlength=3).float() / 4000
    torch.testing.assert_close(frequencies, probs, atol=0.03, rtol=0)


def test_a_vanishing_temperature_is_greedy_and_finite() -> None:
    logits = torch.randn(1, V)
    out = sample(
        logits,
        [SamplingParams(do_sample=True, temperature=1e-300)],
        [[1]],
        [torch.Generator().manual_seed(0)],
    )
    assert out.token_ids == [int(logits.argmax())]
    assert out.logprobs[0] == out.logprobs[0]  # not NaN


@pytest.mark.parametrize("params", TOP_N_CASES)
def test_logprobs_are_the_processed_log_softmax_and_the_input_is_untouched(params) -> None:
    """The chosen and top log-probabilities are those of the full log_softmax of the
    processed logits (computed as logit - logsumexp), and ``sample`` never edits the
    caller's tensor, even where it applies penalties or warpers."""
    logits = torch.randn(3, V)
    before = logits.clone()
    generators = [torch.Generator().manual_seed(7) for _ in range(3)]
    out = sample(logits, [params] * 3, [[1, 2]] * 3, generators)
    assert torch.equal(logits, before)
    processed = _penalties(logits.clone(), [params] * 3, [[1, 2]] * 3)
    if is_sampling(params):
        processed = _warp(processed, [params] * 3)
    log_probs = processed.log_softmax(-1)
    for i in range(3):
        token = out.token_ids[i]
        assert out.logprobs[i] == pytest.approx(log_probs[i, token].item(), abs=1e-5)
        top = log_probs[i].topk(params.top_n_tokens)
        assert out.top_ids[i] == top.indices.tolist()
        assert out.top_logprobs[i] == pytest.approx(top.values.tolist(), abs=1e-5)


@pytest.mark.parametrize("params", TOP_N_CASES)
def test_bfloat16_logits_sample_as_their_float32_widening(params) -> None:
    """A bf16 model's logits reach the sampler as they are: the same tokens and
    log-probabilities as from their float32 copy, and the caller's tensor untouched."""
    logits = (torch.randn(5, 300) * 4).bfloat16()
    before = logits.clone()
    outs = [
        sample(
            rows,
            [params] * 5,
            [[1, 2]] * 5,
            [torch.Generator().manual_seed(i) for i in range(5)],
        )
        for rows in (logits, logits.float())
    ]
    assert outs[0] == outs[1]
    assert torch.equal(logits, before)
