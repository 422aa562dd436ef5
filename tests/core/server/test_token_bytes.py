"""TokenBytes: a token's exact bytes, even when it holds part of a UTF-8 character."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from tgi_core.server.token_bytes import TokenBytes

TEXT = "def café(x):\n    return '日本語' + x  # ünïcode"


def test_byte_level_bpe_tokens_join_to_the_texts_bytes(tiny_llama: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama))
    token_bytes = TokenBytes(tokenizer)
    assert token_bytes.byte_level
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    pieces = [token_bytes(i) for i in ids]
    assert b"".join(pieces) == TEXT.encode()
    # the point: some tokens hold part of a character, and keep their real bytes
    assert any(
        b"\xef\xbf\xbd" not in p and tokenizer.decode([i]) == "\ufffd"
        for i, p in zip(ids, pieces, strict=True)
    )


def sentencepiece_style() -> PreTrainedTokenizerFast:
    """A Llama-2-style tokenizer: ``▁`` for spaces, ``<0xHH>`` byte fallback."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for piece in ("▁", "d", "e", "f", "c", "a", "x", "(", ")", ":", "▁d", "▁de", "▁def"):
        vocab.setdefault(piece, len(vocab))
    model = models.BPE(
        vocab,
        [("▁", "d"), ("▁d", "e"), ("▁de", "f")],
        unk_token="<unk>",
        byte_fallback=True,
    )
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
    )
    tokenizer.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>")


def test_byte_fallback_tokens_are_their_bytes() -> None:
    tokenizer = sentencepiece_style()
    token_bytes = TokenBytes(tokenizer)
    assert token_bytes.byte_fallback and not token_bytes.byte_level
    text = "def café(x): 日本"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert b"".join(token_bytes(i) for i in ids) == (" " + text).encode()
    assert token_bytes(tokenizer.convert_tokens_to_ids("<0xC3>")) == b"\xc3"
