"""Normalization layers: RMSNorm (with a fused residual add) and LayerNorm."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tgi_core.model.layers import fused
from tgi_core.model.weights import LazyTensor


def load_whole(param: nn.Parameter, loaded: LazyTensor, shard_id: object = None) -> None:
    """The weight loader of a parameter every rank holds whole."""
    loaded.copy_into(param.data)


def replicated_parameter(*shape: int, dtype: torch.dtype | None = None) -> nn.Parameter:
    """A parameter every rank holds whole, loaded as is."""
    param = nn.Parameter(
        torch.ones(*shape, dtype=dtype or torch.get_default_dtype()), requires_grad=False
    )
    param.weight_loader = load_whole  # type: ignore[attr-defined]
    return param


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x^2) + eps)``, computed in float32 like transformers."""

    def __init__(
        self, hidden_size: int, eps: float = 1e-6, *, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        self.eps = eps
        self.weight = replicated_parameter(hidden_size, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused.applies(x, self.weight):  # eager on CPU: one C++ call
            return fused.rms_norm(x, self.weight, self.eps)
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)

    def add_forward(
        self, x: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalize ``x + residual``; returns ``(normalized, x + residual)``."""
        if (
            fused.applies(x, self.weight)
            and residual.dtype == x.dtype
            and residual.shape == x.shape
        ):
            return fused.add_rms_norm(x, residual, self.weight, self.eps)
        summed = x + residual
        return self.forward(summed), summed


class LayerNorm(nn.Module):
    """LayerNorm with weight and bias."""

    def __init__(
        self, hidden_size: int, eps: float = 1e-5, *, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        self.eps = eps
        self.weight = replicated_parameter(hidden_size, dtype=dtype)
        self.bias = replicated_parameter(hidden_size, dtype=dtype)
        self.bias.data.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
