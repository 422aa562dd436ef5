"""The exact bytes of a token, for OpenAI's ``logprobs.content[].bytes``.

Decoding a single token turns a partial UTF-8 character into U+FFFD, so its bytes can't
come from the decoded text. Byte-level BPE tokenizers (GPT-2, Llama 3, Qwen) spell each
byte as one printable character; SentencePiece-style tokenizers with byte fallback
(Llama 2, Mistral) spell raw bytes as ``<0xHH>`` and spaces as ``▁``. Other tokenizers
fall back to the decoded text's UTF-8.
"""

from __future__ import annotations

import json
import re
from functools import cache
from typing import Any

_HEX_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@cache
def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte ↔ printable-character table, inverted: character → byte."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def _decoder_types(tokenizer: Any) -> set[str]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return set()
    try:
        decoder = json.loads(backend.to_str()).get("decoder")
    except (ValueError, AttributeError):
        return set()
    found: set[str] = set()
    stack = [decoder]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if isinstance(node.get("type"), str):
                found.add(node["type"])
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return found


class TokenBytes:
    """``token_bytes(token_id)``: the bytes the token stands for (cached per id)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        kinds = _decoder_types(tokenizer)
        self.byte_level = "ByteLevel" in kinds
        self.byte_fallback = "ByteFallback" in kinds
        self._cache: dict[int, bytes] = {}

    def __call__(self, token_id: int) -> bytes:
        cached = self._cache.get(token_id)
        if cached is None:
            cached = self._cache[token_id] = self._compute(token_id)
        return cached

    def _compute(self, token_id: int) -> bytes:
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if isinstance(piece, str) and token_id not in set(self.tokenizer.all_special_ids):
            if self.byte_level:
                table = _byte_level_decoder()
                if all(ch in table for ch in piece):
                    return bytes(table[ch] for ch in piece)
            if self.byte_fallback:
                match = _HEX_BYTE.fullmatch(piece)
                if match:
                    return bytes([int(match.group(1), 16)])
                return piece.replace("▁", " ").encode()
        text = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return str(text).encode("utf-8", "replace")
