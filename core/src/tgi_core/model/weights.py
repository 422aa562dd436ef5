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
#: How much of a tensor is read at once while copying it into a parameter.
COPY_CHUNK_BYTES = 16 * 1024 * 1024


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

    def copy_into(self, target: torch.Tensor) -> None:
        """Read the slice into ``target`` (converting its dtype), a few MiB at a time.

        Reading in row chunks keeps the memory in flight small, so loading a float32
        checkpoint as bfloat16 never holds a whole float32 tensor.
        """
        if tuple(target.shape) != tuple(self.shape):
            raise ValueError(
                f"{self.name}: checkpoint shape {tuple(self.shape)} does not match the model's "
                f"{tuple(target.shape)}"
            )
        if not self.shape or self.shape[0] <= 1:
            target.copy_(self.load())
            return
        row_bytes = max(1, target[0].numel()) * 4
        rows = max(1, COPY_CHUNK_BYTES // row_bytes)
        for start in range(0, self.shape[0], rows):
            length = min(rows, self.shape[0] - start)
            target[start : start + length].copy_(self.narrow(0, start, length).load())

    def __repr__(self) -> str:
        return f"LazyTensor({self.name!r}, shape={self.shape})"


class SafetensorsWeights:
    """The tensors of a checkpoint's ``.safetensors`` files, opened lazily by name."""

    def __init__(self, files: dict[str, Path]) -> None:
        #: tensor name -> the file holding it
        self.files = files
        self._handles: dict[Path, Any] = {}
        #: bytes read from the files so far (a rank of a sharded model reads its share)
        self.bytes_read = 0

    @classmethod
    def from_files(cls, paths: list[Path]) -> SafetensorsWeights:
        """Index every tensor name in ``paths`` (reads only the headers)."""
        from safetensors import safe_open

        files: dict[str, Path] = {}
        for path in paths:
            with safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    if name in files:
                        raise ValueError(
                            f"tensor {name} is in both {files[name].name} and {path.name}"
                        )
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
                tensor = self._handle(self.files[name]).get_tensor(name)
            else:
                tensor = tensor_slice[slices]
            self.bytes_read += tensor.numel() * tensor.element_size()
            return tensor

        return LazyTensor(name, shape, read)
