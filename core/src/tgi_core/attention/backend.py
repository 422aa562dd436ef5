"""The attention backend protocol.

A backend decides the KV cache's dtype, prepares per-step metadata once (``prepare``)
and computes attention for each layer (``forward``): it writes the step's new keys and
values into the paged cache, then attends every new query to its sequence's past and
present keys. It declares the features it supports; the server refuses a model whose
``ModelSpec.requires`` the chosen backend lacks.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

import torch

if TYPE_CHECKING:
    from tgi_core.attention.batch import ForwardBatch
    from tgi_core.model.layers.attention import Attention


class AttentionBackend(ABC):
    """Base class of attention backends; one instance serves one model."""

    name: ClassVar[str]
    features: ClassVar[frozenset[str]]

    def kv_cache_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        """The dtype the KV cache is stored in, for a model computing in ``model_dtype``."""
        return model_dtype

    def prepare(self, batch: ForwardBatch) -> Any:
        """Per-step metadata shared by every layer (index tensors, masks); default none."""
        return None

    @abstractmethod
    def forward(
        self,
        layer: Attention,
        q: torch.Tensor,
        k: torch.Tensor | None,
        v: torch.Tensor | None,
        batch: ForwardBatch,
    ) -> torch.Tensor:
        """Write ``k``/``v`` ``[T, Hkv, D]`` to the cache and attend with ``q`` ``[T, H, D]``.

        Returns ``[T, H * D]`` in ``q``'s dtype. Each query at position ``p`` of its
        sequence sees keys at positions ``<= p`` of the same sequence (and, with a
        sliding window ``w``, only those ``> p - w``); ALiBi adds ``slope * key_pos``,
        a relative position bias adds ``bias(key_pos - p)``. By ``layer.kind``:
        an ``"encoder"`` layer's q/k/v are the step's packed sources
        (``batch.encoder``), each attending to all of itself, nothing cached; a
        ``"cross"`` layer gets no k/v and attends to its sequence's ``encoder_len``
        source keys in the cache. A backend without the features ``relative_bias`` and
        ``cross_attention`` may ignore both (models needing them are refused).
        """


def missing_features(required: frozenset[str], backend_features: frozenset[str]) -> list[str]:
    """Which of ``required`` a backend lacks, sorted."""
    return sorted(required - backend_features)
