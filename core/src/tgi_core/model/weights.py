"""Lazy access to checkpoint tensors: nothing is read until a layer asks for its slice.

A :class:`LazyTensor` is a tensor's shape plus a way to read any rectangular slice of
it; ``narrow()`` composes slices without reading, ``load()`` reads. Layers receive
LazyTensors in their ``weight_loader`` and read only their tensor-parallel shard.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

Reader = Callable[[tuple[slice, ...]], torch.Tensor]


class LazyTensor:
    """A slice of a stored tensor, read on ``load()``."""

    __slots__ = ("_read", "_slices", "name", "shape")

    def __init__(
        self,
        name: str,
        shape: tuple[int, ...],
        read: Reader,
        slices: tuple[slice, ...] | None = None,
    ) -> None:
        self.name = name
        self.shape = shape
        self._read = read
        self._slices = slices if slices is not None else tuple(slice(0, n) for n in shape)

    @classmethod
    def of(cls, tensor: torch.Tensor, name: str = "tensor") -> LazyTensor:
        """Wrap an in-memory tensor (tests, converted weights)."""
        return cls(name, tuple(tensor.shape), lambda slices: tensor[slices])

    def narrow(self, dim: int, start: int, length: int) -> LazyTensor:
        """The slice ``[start, start + length)`` along ``dim``, still unread."""
        dim = dim % len(self.shape)
        if start < 0 or length < 0 or start + length > self.shape[dim]:
            raise ValueError(
                f"{self.name}: cannot take [{start}, {start + length}) of dimension {dim} "
                f"with size {self.shape[dim]}"
            )
        base = self._slices[dim].start
        slices = list(self._slices)
        slices[dim] = slice(base + start, base + start + length)
        shape = list(self.shape)
        shape[dim] = length
        return LazyTensor(self.name, tuple(shape), self._read, tuple(slices))

    def load(self) -> torch.Tensor:
        """Read the slice into memory."""
        if not self.shape:
            return self._read(())
        return self._read(self._slices)

    def __repr__(self) -> str:
        return f"LazyTensor({self.name!r}, shape={self.shape})"


class SafetensorsWeights:
    """The tensors of a checkpoint's ``.safetensors`` files, opened lazily by name."""

    def __init__(self, files: dict[str, Path]) -> None:
        #: tensor name -> the file holding it
        self.files = files
        self._handles: dict[Path, Any] = {}

    @classmethod
    def from_files(cls, paths: list[Path]) -> SafetensorsWeights:
        """Index every tensor name in ``paths`` (reads only the headers)."""
        from safetensors import safe_open

        files: dict[str, Path] = {}
        for path in paths:
            with safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    files[name] = path
        return cls(files)

    def _handle(self, path: Path) -> Any:
        handle = self._handles.get(path)
        if handle is None:
            from safetensors import safe_open

            handle = safe_open(str(path), framework="pt")
            self._handles[path] = handle
        return handle

    def names(self) -> Iterator[str]:
        return iter(self.files)

    def __contains__(self, name: object) -> bool:
        return name in self.files

    def __len__(self) -> int:
        return len(self.files)

    def get(self, name: str) -> LazyTensor:
        """A lazy view of tensor ``name``."""
        tensor_slice = self._handle(self.files[name]).get_slice(name)
        shape = tuple(tensor_slice.get_shape())

        def read(slices: tuple[slice, ...]) -> torch.Tensor:
            if not slices:
                return self._handle(self.files[name]).get_tensor(name)
            return tensor_slice[slices]

        return LazyTensor(name, shape, read)
