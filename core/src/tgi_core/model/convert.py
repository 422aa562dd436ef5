"""``tgi-core convert DIR``: PyTorch pickle weights to safetensors, safely.

Pickle files can run code when loaded; they are read here with
``torch.load(weights_only=True)``, which refuses anything but tensors and plain
containers, and written next to them as ``model.safetensors`` (or shards with an index
when the original was sharded). The ``.bin`` files are left in place.
"""

from __future__ import annotations

import json
from pathlib import Path

from tgi_core.model.checkpoint import CheckpointError

PICKLE_INDEX = "pytorch_model.bin.index.json"


def _pickle_files(folder: Path) -> list[Path]:
    index = folder / PICKLE_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text()).get("weight_map", {})
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
            raise CheckpointError(f"{index} is not a valid index: {exc}") from None
        return sorted({folder / name for name in weight_map.values()})
    files = sorted(folder.glob("pytorch_model*.bin")) or sorted(
        p for pattern in ("*.bin", "*.pt", "*.pth") for p in folder.glob(pattern)
    )
    return files


def convert_checkpoint(folder: str | Path) -> list[Path]:
    """Write safetensors files converted from the pickle weights in ``folder``."""
    import torch
    from safetensors.torch import save_file

    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder")
    sources = _pickle_files(folder)
    if not sources:
        raise CheckpointError(f"{folder} has no pickle weights (*.bin, *.pt, *.pth) to convert")
    written, weight_map = [], {}
    for number, source in enumerate(sources, start=1):
        try:
            try:
                state = torch.load(source, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):
                    raise
                state = torch.load(source, map_location="cpu", weights_only=True)  # old format
        except Exception as exc:
            raise CheckpointError(
                f"{source} cannot be read safely (weights_only=True refuses arbitrary "
                f"objects): {exc}"
            ) from None
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        tensors = {
            name: tensor.detach().contiguous().clone()  # tied tensors share storage
            for name, tensor in state.items()
            if isinstance(tensor, torch.Tensor)
        }
        name = (
            "model.safetensors"
            if len(sources) == 1
            else f"model-{number:05d}-of-{len(sources):05d}.safetensors"
        )
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        written.append(folder / name)
        weight_map.update(dict.fromkeys(tensors, name))
    if len(sources) > 1:
        index = {"metadata": {}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        written.append(folder / "model.safetensors.index.json")
    return written
