"""Incremental detokenization: never half a character, special tokens skipped, stop
sequences held back while they could still match."""

from __future__ import annotations

from pathlib import Path

import pytest

from tgi_core.engine.detokenizer import IncrementalDetokenizer
from tgi_core.model.fixtures import train_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    return train_tokenizer(Path(tmp_path_factory.mktemp("tok")), 300)


def stream(tokenizer, text: str, stop=(), prompt="x = 1\n"):
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode(prompt), stop)
    pieces = [detok.add(token) for token in tokenizer.encode(text)]
    return pieces, detok


def test_multibyte_characters_are_never_split(tokenizer) -> None:
    text = "héllo wörld ☃ 日本語 🐍"
    ids = tokenizer.encode(text)
    assert len(ids) > len(text.split())  # the byte-level vocab splits these characters
    pieces, detok = stream(tokenizer, text)
    assert "".join(pieces) + detok.flush() == text
    assert not any("\ufffd" in piece for piece in pieces)


def test_special_tokens_are_not_text(tokenizer) -> None:
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode("a"))
    pieces = [detok.add(t) for t in [*tokenizer.encode("def f"), tokenizer.eos_token_id]]
    assert "".join(pieces) == "def f"
    assert detok.token_text(tokenizer.eos_token_id) == "</s>"


def test_stop_sequence_is_held_back_then_cut(tokenizer) -> None:
    pieces, detok = stream(tokenizer, "return value\n\nclass Other:", stop=("\n\ncl",))
    assert detok.stopped_by == "\n\ncl"
    assert "".join(pieces) == "return value"
    assert all("\n" not in piece for piece in pieces)


def test_text_that_might_start_a_stop_is_released_when_it_does_not(tokenizer) -> None:
    pieces, detok = stream(tokenizer, "a = b\nc = d", stop=("\nend",))
    assert detok.stopped_by is None
    assert "".join(pieces) + detok.flush() == "a = b\nc = d"
