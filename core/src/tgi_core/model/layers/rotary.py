"""Rotary position embeddings: default, linear, dynamic NTK, llama3 and YaRN.

Settings come from a Hugging Face config in either spelling: transformers 5's
``rope_parameters`` (``rope_type``, ``rope_theta``, ...) or the Hub's older
``rope_theta`` + ``rope_scaling`` (``type``/``rope_type``, ``factor``, ...).

``RotaryEmbedding.cos_sin(positions)`` is computed once per forward step and shared by
every layer; ``apply_rotary`` rotates queries and keys with it (the "neox" layout that
rotates the two halves of each head, as transformers' Llama does).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from tgi_core.model.layers import fused, opaque

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


def rope_parameters(hf_config: Any) -> dict[str, Any]:
    """The rope settings of ``hf_config`` as one dict with ``rope_type`` and ``rope_theta``."""
    params = getattr(hf_config, "rope_parameters", None)
    if isinstance(params, dict) and "rope_type" in params and "rope_theta" in params:
        return dict(params)
    merged: dict[str, Any] = dict(getattr(hf_config, "rope_scaling", None) or {})
    merged.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    if isinstance(params, dict):
        merged.update(params)
    merged["rope_type"] = merged.get("rope_type") or merged.get("type") or "default"
    return merged


def _inverse_frequencies(dim: int, base: float) -> torch.Tensor:
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    return 1.0 / (base**exponents)


def _llama3(inv_freq: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
    factor = params["factor"]
    low, high = params["low_freq_factor"], params["high_freq_factor"]
    old_context = params["original_max_position_embeddings"]
    wavelength = 2 * math.pi / inv_freq
    scaled = torch.where(wavelength > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelength - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelength >= old_context / high) & (wavelength <= old_context / low)
    return torch.where(medium, blended, scaled)


def _yarn(
    dim: int, base: float, params: dict[str, Any], max_position: int
) -> tuple[torch.Tensor, float]:
    original = params["original_max_position_embeddings"]
    factor = params.get("factor") or max_position / original

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        m, m_all = params.get("mscale"), params.get("mscale_all_dim")
        attention_factor = (
            mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
        )
    beta_fast, beta_slow = params.get("beta_fast") or 32, params.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    frequencies = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation, interpolation = 1.0 / frequencies, 1.0 / (factor * frequencies)
    keep = 1 - ramp  # share of the unscaled (extrapolated) frequency
    return interpolation * (1 - keep) + extrapolation * keep, float(attention_factor)


class RotaryEmbedding(nn.Module):
    """Rotary embedding of the first ``rotary_dim`` channels of each head."""

    inv_freq: torch.Tensor

    def __init__(
        self,
        head_dim: int,
        params: dict[str, Any],
        max_position: int,
        *,
        rotary_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim or int(head_dim * params.get("partial_rotary_factor", 1.0))
        self.rope_type = params["rope_type"]
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"unsupported rope type {self.rope_type!r}; supported: "
                f"{', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        self.base = float(params["rope_theta"])
        self.max_position = max_position
        self.factor = float(params.get("factor") or 1.0)
        self.attention_scaling = 1.0
        inv_freq = _inverse_frequencies(self.rotary_dim, self.base)
        if self.rope_type == "llama3":
            inv_freq = _llama3(inv_freq, params)
        elif self.rope_type == "yarn":
            inv_freq, self.attention_scaling = _yarn(
                self.rotary_dim, self.base, params, max_position
            )
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        #: this embedding's key for the ``tgi::rotary_cos_sin`` op, which a compiled
        #: model calls (-1: none; set by ``model/compiled.py``)
        self.op_key = -1

    def _dynamic_inv_freq(self, seq_lens: torch.Tensor) -> torch.Tensor:
        """Per-token frequencies for dynamic NTK: the base grows with the sequence length."""
        dim = self.rotary_dim
        seq_len = seq_lens.float().clamp(min=self.max_position)
        base = self.base * ((self.factor * seq_len / self.max_position) - (self.factor - 1)) ** (
            dim / (dim - 2)
        )
        exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
        return 1.0 / (base[:, None] ** exponents[None, :])  # [T, dim/2]

    def cos_sin(
        self, positions: torch.Tensor, seq_lens: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos`` and ``sin`` of shape ``[T, rotary_dim]`` (float32) for ``positions``.

        ``seq_lens`` (per token: the length of its sequence after this step) is needed
        by dynamic NTK scaling only; each sequence's tokens are rotated with the
        frequencies of its own length, as transformers does for one sequence. In a
        compiled model they are one opaque op (``layers/opaque.py``), computed once a step.
        """
        if self.op_key >= 0 and torch.compiler.is_compiling():
            return opaque.rotary_cos_sin(positions, seq_lens, self.op_key)
        pos = positions.float()
        if self.rope_type == "linear":
            pos = pos / self.factor
        if self.rope_type == "dynamic" and seq_lens is not None:
            freqs = pos[:, None] * self._dynamic_inv_freq(seq_lens)
        else:
            freqs = pos[:, None] * self.inv_freq[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos() * self.attention_scaling, angles.sin() * self.attention_scaling


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[T, heads, head_dim]``; ``cos``/``sin`` are ``[T, rotary_dim]``."""
    if fused.applies(x, cos) and sin.dtype == x.dtype:  # eager on CPU: one C++ call
        return fused.rotary(x, cos, sin)
    rotary_dim = cos.shape[-1]
    cos = cos.to(x.dtype)[:, None, :]
    sin = sin.to(x.dtype)[:, None, :]
    half = rotary_dim // 2
    first, second = x[..., :half], x[..., half:rotary_dim]
    # rot * cos + cat(-second, first) * sin, without building the rotated copy (the
    # same values: a + (-b) * c is a - b * c in IEEE arithmetic)
    out = (
        first * cos[..., :half] - second * sin[..., :half],
        second * cos[..., half:] + first * sin[..., half:],
    )
    rest = x[..., rotary_dim:]
    return torch.cat(out if rest.shape[-1] == 0 else (*out, rest), dim=-1)


def get_rope(head_dim: int, hf_config: Any) -> RotaryEmbedding:
    """The rotary embedding ``hf_config`` asks for."""
    params = rope_parameters(hf_config)
    return RotaryEmbedding(head_dim, params, int(hf_config.max_position_embeddings))
