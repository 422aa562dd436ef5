"""What the load generator sends: length ranges, prompts and seeded request plans.

Prompts are plain words. Given a tokenizer (``tokenizer.json``), a prompt is built so
that the tokenizer counts exactly the asked number of tokens (special tokens it adds
included, as a server counts them); without one, a prompt of length N is N words.
Everything is drawn from one ``random.Random(seed)``: the same seed gives the same plan.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tgi_core.errors import TGIError

_COMMON_WORDS = """
    the of and to in is was for on that with as by at from his her they this which
    but not are have had were one all been their there would when who will more if no
    out so said what up its about than into them can only other new some could time
    these two may then first any like now such our over man even most made after also
    did many before must through back years where much your way well down should
    because each just those people how too little state good very make world still own
    see men work long get here between both life being under never day same another
    know while last might great old year off come since against go came right used
    take three place again house small found part however find thought every general
    water light music river stone garden window table paper letter number morning
"""
#: Common English words: prompts when no tokenizer is given (one word each).
WORDS = tuple(_COMMON_WORDS.split())


class WorkloadError(TGIError):
    """A length range or tokenizer the load generator cannot use."""


@dataclass(frozen=True, slots=True)
class LengthRange:
    """A token count: fixed (``low == high``) or drawn uniformly from ``low..high``."""

    low: int
    high: int

    @classmethod
    def parse(cls, text: str) -> LengthRange:
        """``"128"`` (fixed) or ``"64:256"`` (uniform, both ends included); at least 1."""
        parts = text.strip().split(":")
        try:
            low, high = (int(parts[0]), int(parts[-1])) if len(parts) <= 2 else (0, -1)
        except ValueError:
            low, high = 0, -1
        if not 1 <= low <= high:
            raise WorkloadError(
                f"{text!r} is not a length: give N or LOW:HIGH with 1 <= LOW <= HIGH"
            )
        return cls(low, high)

    def sample(self, rng: random.Random) -> int:
        return self.low if self.low == self.high else rng.randint(self.low, self.high)

    def __str__(self) -> str:
        return str(self.low) if self.low == self.high else f"{self.low}:{self.high}"


@dataclass(frozen=True, slots=True)
class PlannedRequest:
    """One request to send: its prompt, its token count if known, how many new tokens.

    The prompt is a text, or token ids (which only the OpenAI API takes).
    """

    prompt: str | tuple[int, ...]
    prompt_tokens: int | None
    max_new_tokens: int
    seed: int


class PromptMaker(Protocol):
    def make(self, length: int, rng: random.Random, prefix: str = "") -> tuple[str, int | None]:
        """``prefix`` followed by ``length`` more tokens, and the text's token count."""
        ...


class WordPrompts:
    """Prompts of ``length`` words (their token count depends on the server's tokenizer)."""

    def make(self, length: int, rng: random.Random, prefix: str = "") -> tuple[str, int | None]:
        words = " ".join(rng.choice(WORDS) for _ in range(length))
        return (f"{prefix} {words}" if prefix else words), None


class TokenizerPrompts:
    """Prompts of exact token lengths under a ``tokenizers`` tokenizer.

    Words are drawn from the tokenizer's own vocabulary (tokens that are whole
    alphabetic words and stay one token each between spaces), so the length converges
    in a step or two; if the vocabulary has too few such words, common English words
    are used and the length is fitted word by word, then token by token.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.pool = self._single_token_words() or list(WORDS)

    @classmethod
    def load(cls, path: str | Path) -> TokenizerPrompts:
        """From a ``tokenizer.json`` or a checkpoint folder holding one."""
        from tokenizers import Tokenizer

        file = Path(path)
        if file.is_dir():
            file = file / "tokenizer.json"
        if not file.is_file():
            raise WorkloadError(f"no tokenizer.json at {path}")
        try:
            return cls(Tokenizer.from_file(str(file)))
        except Exception as exc:  # tokenizers raises plain Exceptions for bad files
            raise WorkloadError(f"{file} is not a tokenizer.json: {exc}") from None

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=True).ids)

    def _single_token_words(self, wanted: int = 1000, examined: int = 5000) -> list[str]:
        vocab = sorted(self.tokenizer.get_vocab().values())
        pool: list[str] = []
        for token_id in vocab[:examined]:
            word = self.tokenizer.decode([token_id]).strip()
            if len(word) < 2 or not word.isalpha() or not word.isascii():
                continue
            ids = self.tokenizer.encode(f"{word} {word} {word}", add_special_tokens=False).ids
            if len(ids) == 3:
                pool.append(word)
                if len(pool) == wanted:
                    break
        return pool if len(pool) >= 16 else []

    def make(self, length: int, rng: random.Random, prefix: str = "") -> tuple[str, int | None]:
        target = self.count(prefix) + length
        words = [rng.choice(self.pool) for _ in range(length)]

        def text_of(chosen: list[str]) -> str:
            body = " ".join(chosen)
            return f"{prefix} {body}" if prefix and body else prefix or body

        for _ in range(16):  # fit word by word
            text = text_of(words)
            have = self.count(text)
            if have == target:
                return text, have
            if have < target:
                words += [rng.choice(self.pool) for _ in range(target - have)]
            elif len(words) > 1:
                del words[-max(1, min(len(words) - 1, (have - target) // 2)) :]
            else:
                break
        # token by token: cut the encoding of the fitted text at the target
        text = text_of(words)
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        specials = self.count(text) - len(ids)
        cut = self.tokenizer.decode(ids[: max(1, target - specials)])
        return cut, self.count(cut)


def plan_requests(
    count: int,
    *,
    prompt_tokens: LengthRange,
    max_new_tokens: LengthRange,
    maker: PromptMaker,
    rng: random.Random,
    prefix: str = "",
) -> list[PlannedRequest]:
    """``count`` requests drawn from ``rng``: each prompt is ``prefix`` plus its own tokens."""
    planned = []
    for _ in range(count):
        prompt, tokens = maker.make(prompt_tokens.sample(rng), rng, prefix)
        planned.append(
            PlannedRequest(prompt, tokens, max_new_tokens.sample(rng), rng.getrandbits(32))
        )
    return planned


def shared_prefix(maker: PromptMaker, length: int, rng: random.Random) -> str:
    """A prefix of ``length`` tokens (words without a tokenizer), or "" for 0."""
    return maker.make(length, rng)[0] if length > 0 else ""
