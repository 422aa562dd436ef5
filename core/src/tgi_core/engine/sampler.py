"""Choosing each sequence's next token, vectorised over the batch.

TGI's order of processors: repetition penalty (CTRL: positive logits divided, negative
multiplied, over prompt and generated tokens), frequency and presence penalties, then
the warpers (temperature, top-k, top-p, typical-p, min-p), then the choice. As in TGI,
a request samples when ``do_sample`` is set or any warper is active; temperature 0 is
greedy. Sampling draws ``argmax(p / E)`` with ``E ~ Exp(1)`` from the sequence's own
seeded generator, so its tokens do not depend on what else is in the batch.
Log-probabilities are those of the processed distribution, as TGI reports them.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from tgi_core.engine.logits_kernel import greedy_logsumexp
from tgi_core.engine.requests import SamplingParams


def is_sampling(params: SamplingParams) -> bool:
    """Whether ``params`` sample (TGI: ``do_sample`` or any active warper), not greedy."""
    if params.temperature == 0:
        return False
    warpers = (
        params.temperature != 1.0
        or params.top_k > 0
        or params.top_p < 1.0
        or params.typical_p < 1.0
        or params.min_p > 0.0
    )
    return params.do_sample or warpers


@dataclass
class SampleOutput:
    token_ids: list[int]
    logprobs: list[float]
    top_ids: list[list[int]]  # per row, its top_n_tokens alternatives
    top_logprobs: list[list[float]]


def _penalised(params: SamplingParams) -> bool:
    return (
        params.repetition_penalty != 1.0
        or params.frequency_penalty != 0.0
        or params.presence_penalty != 0.0
    )


def _penalties(
    logits: torch.Tensor, params: Seq[SamplingParams], histories: Seq[Seq[int]]
) -> torch.Tensor:
    rows = [i for i, p in enumerate(params) if _penalised(p)]
    for i in rows:  # per row: histories differ in length; rows with penalties are rare
        p, ids = params[i], torch.tensor(histories[i], dtype=torch.int64)
        counts = torch.zeros(logits.shape[1]).index_add_(0, ids, torch.ones(len(ids)))
        present = counts > 0
        row = logits[i]
        if p.repetition_penalty != 1.0:
            penalised = torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty)
            row = torch.where(present, penalised, row)
        if p.frequency_penalty != 0.0:
            scale = counts / max(1, len(ids)) if p.penalty_style == "tgi" else counts
            row = row - p.frequency_penalty * scale
        if p.presence_penalty != 0.0:
            row = row - p.presence_penalty * present.float()
        logits[i] = row
    return logits


def _warp(logits: torch.Tensor, params: Seq[SamplingParams]) -> torch.Tensor:
    """Temperature, top-k, top-p, typical-p and min-p, each row with its own settings."""
    # a vanishing temperature is greedy in the limit; keep the division finite
    temperature = torch.tensor([max(p.temperature, 1e-4) for p in params])[:, None]
    logits = logits / temperature
    top_k = torch.tensor([p.top_k for p in params])
    top_p = torch.tensor([p.top_p for p in params])
    typical = torch.tensor([p.typical_p for p in params])
    min_p = torch.tensor([p.min_p for p in params])
    minus_inf = torch.finfo(logits.dtype).min
    if bool((top_k > 0).any()):
        k = top_k.clamp(min=1, max=logits.shape[1])
        kth = logits.sort(dim=-1, descending=True).values.gather(1, (k - 1)[:, None])
        logits = torch.where((top_k[:, None] > 0) & (logits < kth), minus_inf, logits)
    if bool((top_p < 1.0).any()):
        sorted_logits, order = logits.sort(dim=-1, descending=False)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative <= (1 - top_p)[:, None]
        drop[:, -1] = False  # keep at least the most likely token
        logits = logits.masked_fill(drop.scatter(1, order, drop), minus_inf)
    if bool((typical < 1.0).any()):
        log_probs = logits.log_softmax(-1)
        probs = log_probs.exp()
        entropy = -(log_probs.nan_to_num() * probs).sum(-1, keepdim=True)
        shifted = (-log_probs - entropy).abs()
        sorted_shift, order = shifted.sort(dim=-1)
        cumulative = probs.gather(1, order).cumsum(-1)
        last = (cumulative < typical[:, None]).sum(-1).clamp(max=logits.shape[1] - 1)
        drop = sorted_shift > sorted_shift.gather(1, last[:, None])
        drop &= (typical < 1.0)[:, None]
        logits = logits.masked_fill(drop.scatter(1, order, drop), minus_inf)
    if bool((min_p > 0).any()):
        probs = logits.softmax(-1)
        threshold = min_p[:, None] * probs.max(-1, keepdim=True).values
        logits = logits.masked_fill(probs < threshold, minus_inf)
    return logits


def sample(
    logits: torch.Tensor,
    params: Seq[SamplingParams],
    histories: Seq[Seq[int]],
    generators: Seq[torch.Generator | None],
) -> SampleOutput:
    """Choose one token per row of ``logits`` ``[N, vocab]`` (float32, or a bf16 model's
    bfloat16; not modified).

    Log-probabilities are ``logit - logsumexp(row)`` for the chosen and the top tokens
    only: the full ``log_softmax`` of a batch's rows (64 x 49152 floats: a 12 MB
    output) cost more than the choice itself."""
    sampled = [i for i, p in enumerate(params) if is_sampling(p)]
    if sampled or any(_penalised(p) for p in params):  # edited below: our own float copy
        logits = _penalties(logits.to(torch.float32, copy=True), params, histories)
    if sampled:
        logits[sampled] = _warp(logits[sampled], [params[i] for i in sampled])
    # greedy rows of a bf16 model stay bf16 (the kernel widens them; widening is exact)
    fast = greedy_logsumexp(logits)
    if fast is None:
        logits = logits.float()
        token_ids = logits.max(-1).indices  # argmax's first maximum too, 3x faster on CPU
        normalizer = logits.logsumexp(-1, keepdim=True)
    else:
        token_ids, normalizer = fast
    if sampled:
        probs = logits[sampled].softmax(-1)
        for row, i in enumerate(sampled):
            race = torch.empty_like(probs[row]).exponential_(1, generator=generators[i])
            token_ids[i] = (probs[row] / race).max(-1).indices
    chosen = (logits.gather(1, token_ids[:, None]) - normalizer).squeeze(1)
    top_n = max((p.top_n_tokens for p in params), default=0)
    top_ids: list[list[int]] = [[] for _ in params]
    top_values: list[list[float]] = [[] for _ in params]
    if top_n:
        values, ids = logits.topk(top_n, dim=-1)
        values = values - normalizer
        for i, p in enumerate(params):
            top_ids[i] = ids[i, : p.top_n_tokens].tolist()
            top_values[i] = values[i, : p.top_n_tokens].tolist()
    return SampleOutput(token_ids.tolist(), chosen.tolist(), top_ids, top_values)
