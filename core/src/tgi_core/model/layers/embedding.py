"""Vocabulary-parallel token embedding and LM head.

The vocabulary is split in contiguous ranges across ranks (the last range may be
short). The embedding looks up the ids in its range and the partial results are
summed; the LM head computes the logits of its range and gathers them.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from tgi_core.model.layers import cpu_gemm
from tgi_core.model.parallel import ParallelContext, current_parallel_context
from tgi_core.model.weights import LazyTensor


class VocabularyMethod(Protocol):
    """How a quantized vocabulary table computes (a quantizer's ``vocabulary_method``).

    One object may serve an embedding and the LM head tied to it. Its tensors are
    registered as buffers of the modules it serves (:meth:`buffers`), the table's rows
    being this rank's vocabulary range.
    """

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``[T, hidden]`` (in the model's dtype) of the local ``ids``."""

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden @ table.T``: ``[T, local vocabulary]`` in ``hidden``'s dtype."""

    def buffers(self) -> dict[str, torch.Tensor]:
        """The tensors it holds, by name (registered on the modules it serves)."""


class VocabParallelEmbedding(nn.Module):
    """``num_embeddings x embedding_dim`` table, rows split across ranks."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        dtype: torch.dtype | None = None,
        tp: ParallelContext | None = None,
    ) -> None:
        super().__init__()
        self.tp = tp or current_parallel_context()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.rows_per_rank = math.ceil(num_embeddings / self.tp.world_size)
        self.vocab_start = min(self.tp.rank * self.rows_per_rank, num_embeddings)
        self.vocab_end = min(self.vocab_start + self.rows_per_rank, num_embeddings)
        self.weight = nn.Parameter(
            torch.zeros(
                self.rows_per_rank, embedding_dim, dtype=dtype or torch.get_default_dtype()
            ),
            requires_grad=False,
        )
        self.weight.weight_loader = self.weight_loader  # type: ignore[attr-defined]
        #: a quantized table replacing ``weight`` (:meth:`quantize`), or None
        self.method: VocabularyMethod | None = None

    def quantize(self, method: VocabularyMethod) -> None:
        """Compute through ``method`` from now on; the float weight is dropped."""
        del self.weight
        self.method = method
        for name, tensor in method.buffers().items():
            self.register_buffer(name, tensor, persistent=False)

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        if self.method is not None:
            return self.method.lookup(ids)
        return F.embedding(ids, self.weight)

    def weight_loader(
        self, param: nn.Parameter, loaded: LazyTensor, shard_id: object = None
    ) -> None:
        if loaded.shape != (self.num_embeddings, self.embedding_dim):
            raise ValueError(
                f"{loaded.name}: checkpoint shape {loaded.shape} does not match the model's "
                f"{(self.num_embeddings, self.embedding_dim)}"
            )
        rows = self.vocab_end - self.vocab_start
        loaded.narrow(0, self.vocab_start, rows).copy_into(param.data[:rows])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.world_size == 1:
            return self._lookup(input_ids)
        in_range = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        local = torch.where(in_range, input_ids - self.vocab_start, 0)
        rows = self._lookup(local)
        return self.tp.all_reduce(rows * in_range.unsqueeze(-1).to(rows.dtype))


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection to vocabulary logits; may share its weight with the embedding."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        bias: bool = False,
        dtype: torch.dtype | None = None,
        tp: ParallelContext | None = None,
    ) -> None:
        super().__init__(num_embeddings, embedding_dim, dtype=dtype, tp=tp)
        if bias:
            raise NotImplementedError("an LM head bias is not supported yet")
        #: a packed copy of the weight (``cpu_gemm``), made on first use and
        #: remade if the weight's storage changes; the embedding keeps the plain weight
        self._packed: tuple[int, torch.Tensor] | None = None

    def _packed_weight(self) -> torch.Tensor | None:
        if not cpu_gemm.can_pack(self.weight):
            return None
        key = self.weight.data_ptr()
        if self._packed is None or self._packed[0] != key:
            self._packed = (key, cpu_gemm.pack(self.weight))
        return self._packed[1]

    def tie_to(self, embedding: VocabParallelEmbedding) -> None:
        """Share ``embedding``'s weight (``tie_word_embeddings``)."""
        self.weight = embedding.weight

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Logits ``[T, vocab]`` (every rank returns the whole vocabulary)."""
        if self.method is not None:
            logits = self.method.logits(hidden_states)
        elif (packed := self._packed_weight()) is not None:
            logits = cpu_gemm.packed_linear(hidden_states, packed, None, self.weight.shape[0])
        else:
            logits = F.linear(hidden_states, self.weight)
        if self.tp.world_size == 1:
            return logits
        return self.tp.all_gather_last_dim(logits)[..., : self.num_embeddings]
