"""The load generator's workload: length ranges, exact prompt lengths, seeded plans."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from tgi_core.bench.command import BenchSettings, make_plans
from tgi_core.bench.workload import (
    WORDS,
    LengthRange,
    TokenizerPrompts,
    WordPrompts,
    WorkloadError,
    plan_requests,
)
from tgi_core.model.fixtures import train_word_level_tokenizer


@pytest.mark.parametrize(
    ("text", "expected"), [("128", LengthRange(128, 128)), (" 4:16 ", LengthRange(4, 16))]
)
def test_length_ranges_parse(text: str, expected: LengthRange) -> None:
    assert LengthRange.parse(text) == expected
    assert str(LengthRange.parse(text)) == text.strip()


@pytest.mark.parametrize("text", ["0", "-3", "8:4", "a", "1:2:3", "", "4:"])
def test_bad_length_ranges_are_refused(text: str) -> None:
    with pytest.raises(WorkloadError, match="is not a length"):
        LengthRange.parse(text)


def test_uniform_lengths_stay_in_range_and_cover_it() -> None:
    rng = random.Random(0)
    drawn = {LengthRange(3, 6).sample(rng) for _ in range(200)}
    assert drawn == {3, 4, 5, 6}


@pytest.fixture(scope="module")
def word_level(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("word-level")
    train_word_level_tokenizer(path, 500)
    return path


@pytest.fixture(scope="module")
def bpe(tiny_llama: Path) -> TokenizerPrompts:
    return TokenizerPrompts.load(tiny_llama)


def test_word_level_prompts_are_exact(word_level: Path) -> None:
    maker = TokenizerPrompts.load(word_level / "tokenizer.json")
    assert len(maker.pool) == 496  # every word of the vocabulary
    rng = random.Random(1)
    for length in (1, 7, 128):
        text, count = maker.make(length, rng)
        assert count == length == len(text.split())


def test_bpe_prompts_have_the_asked_token_count(bpe: TokenizerPrompts, tiny_llama: Path) -> None:
    tokenizer = Tokenizer.from_file(str(tiny_llama / "tokenizer.json"))
    rng = random.Random(2)
    for length in (1, 5, 33, 100):
        text, count = bpe.make(length, rng)
        assert count == len(tokenizer.encode(text).ids) == length


def test_prefixed_prompts_count_prefix_and_own_tokens(bpe: TokenizerPrompts) -> None:
    rng = random.Random(3)
    prefix, prefix_tokens = bpe.make(40, rng)
    plan = plan_requests(
        5,
        prompt_tokens=LengthRange(10, 20),
        max_new_tokens=LengthRange(4, 4),
        maker=bpe,
        rng=rng,
        prefix=prefix,
    )
    for planned in plan:
        assert planned.prompt.startswith(prefix + " ")
        assert planned.prompt_tokens is not None
        assert 10 <= planned.prompt_tokens - prefix_tokens <= 20  # type: ignore[operator]
        assert planned.prompt_tokens == bpe.count(planned.prompt)


def test_without_a_tokenizer_prompts_are_words() -> None:
    text, count = WordPrompts().make(12, random.Random(0))
    assert count is None
    assert len(text.split()) == 12 and set(text.split()) <= set(WORDS)


def test_plans_are_seeded_and_levels_get_fresh_prompts() -> None:
    settings = BenchSettings(
        concurrency=(1, 2),
        requests=3,
        prompt_tokens=LengthRange(5, 9),
        max_new_tokens=LengthRange(2, 6),
        shared_prefix=4,
        seed=7,
        warmup=2,
    )
    plans, again = make_plans(settings), make_plans(settings)
    assert plans == again
    assert [(c, len(p)) for c, p in plans.levels] == [(1, 3), (2, 3)]
    assert len(plans.warmup) == 2
    prompts = [r.prompt for r in plans.warmup] + [r.prompt for _, p in plans.levels for r in p]
    assert len(set(prompts)) == len(prompts)
    prefix = " ".join(prompts[0].split()[:4])
    assert all(prompt.startswith(prefix + " ") for prompt in prompts)
    assert make_plans(BenchSettings(seed=8, concurrency=(1,), requests=3)) != make_plans(
        BenchSettings(seed=7, concurrency=(1,), requests=3)
    )
    default = make_plans(BenchSettings(concurrency=(2,)))
    assert len(default.levels[0][1]) == 8  # 4 per client


def test_a_missing_tokenizer_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(WorkloadError, match=r"no tokenizer\.json"):
        TokenizerPrompts.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(WorkloadError, match=r"is not a tokenizer\.json"):
        TokenizerPrompts.load(tmp_path)
