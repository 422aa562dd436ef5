"""The logits kernel (``tgi_core.engine.logits_kernel``) against torch's max and
logsumexp: same indices (the first of equal maxima), normalizers to float32 rounding,
and None (torch's path) wherever it does not apply."""

from __future__ import annotations

import pytest
import torch

from tgi_core.engine import logits_kernel
from tgi_core.engine.logits_kernel import greedy_logsumexp

pytestmark = pytest.mark.skipif(
    logits_kernel._library() is None, reason="no C++ compiler to build the kernel"
)


@pytest.mark.parametrize("shape", [(1, 1), (3, 17), (64, 49152), (5, 1000)])
def test_matches_torch(shape: tuple[int, int]) -> None:
    logits = torch.randn(*shape, generator=torch.Generator().manual_seed(shape[1])) * 8
    got = greedy_logsumexp(logits)
    assert got is not None
    indices, normalizer = got
    assert torch.equal(indices, logits.max(-1).indices)
    torch.testing.assert_close(normalizer, logits.logsumexp(-1, keepdim=True), rtol=1e-6, atol=1e-5)


def test_ties_masked_entries_and_strided_rows() -> None:
    base = torch.full((4, 12), float("-inf"))
    base[:, 3] = base[:, 7] = 2.0  # a tie: the first index wins, as torch's max
    base[1, 5] = 1.0
    logits = base[::2]  # rows 24 floats apart
    indices, normalizer = greedy_logsumexp(logits)  # type: ignore[misc]
    assert indices.tolist() == [3, 3]
    torch.testing.assert_close(normalizer, logits.logsumexp(-1, keepdim=True))


def test_maxima_in_the_vector_body_and_in_the_tail() -> None:
    """200 columns: three 64-wide blocks, then a tail of 8 read with a mask."""
    logits = torch.randn(3, 200, generator=torch.Generator().manual_seed(3))
    logits[0, 130] = logits[0, 70] = 9.0  # the first of two maxima, in the body
    logits[1, 199] = logits[1, 195] = 9.0  # both in the tail
    logits[2] = float("-inf")  # nothing allowed: index 0 and -inf, as torch
    indices, normalizer = greedy_logsumexp(logits)  # type: ignore[misc]
    assert indices.tolist() == logits.max(-1).indices.tolist() == [70, 195, 0]
    torch.testing.assert_close(normalizer, logits.logsumexp(-1, keepdim=True))


@pytest.mark.parametrize("cols", [1, 17, 200, 49152])
def test_bfloat16_logits_as_their_float32_widening(cols: int) -> None:
    logits = (torch.randn(6, cols, generator=torch.Generator().manual_seed(cols)) * 8).bfloat16()
    logits[0, cols // 2] = logits[0, cols - 1] = 40.0  # a tie (the first wins)
    widened = logits.float()
    indices, normalizer = greedy_logsumexp(logits)  # type: ignore[misc]
    assert torch.equal(indices, widened.max(-1).indices)
    expected = widened.logsumexp(-1, keepdim=True)
    torch.testing.assert_close(normalizer, expected, rtol=1e-6, atol=1e-5)


def test_where_it_does_not_apply_it_says_so() -> None:
    assert greedy_logsumexp(torch.randn(2, 8).half()) is None
    assert greedy_logsumexp(torch.randn(8, 2).T) is None  # columns not dense
    with_nan = torch.randn(3, 8)
    with_nan[1, 4] = float("nan")
    assert greedy_logsumexp(with_nan) is None  # torch's NaN semantics apply
