"""A Hugging Face checkpoint folder: config, safetensors weights, generation config.

``Checkpoint.open(path)`` checks the folder and reports every problem a user can fix in
one clear :class:`CheckpointError`: a missing folder or file, invalid JSON, pickle
weights (never loaded implicitly: ``tgi-core convert DIR`` converts them), a shard the
index names but the folder lacks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tgi_core.errors import TGIError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_PATTERNS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt")


class CheckpointError(TGIError):
    """A checkpoint folder cannot be served as it is; the message says why and what to do."""


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from None
    except OSError as exc:
        raise CheckpointError(f"{path} cannot be read: {exc.strerror}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return data


@dataclass(frozen=True)
class Checkpoint:
    """A checked checkpoint folder."""

    path: Path
    config: dict[str, Any]
    weight_files: tuple[Path, ...]
    generation_config: dict[str, Any] | None

    @classmethod
    def open(cls, path: str | Path) -> Checkpoint:
        folder = Path(path)
        if not folder.exists():
            raise CheckpointError(
                f"model folder {folder} does not exist; tgi-core serves checkpoint folders "
                "on this machine (config.json, *.safetensors, tokenizer files) and downloads "
                "nothing"
            )
        if not folder.is_dir():
            raise CheckpointError(f"{folder} is not a folder: give the checkpoint's folder")
        config_path = folder / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"{folder} has no config.json: is it a Hugging Face checkpoint?")
        config = _read_json(config_path)
        generation_path = folder / "generation_config.json"
        generation = _read_json(generation_path) if generation_path.is_file() else None
        return cls(folder, config, _weight_files(folder), generation)

    @property
    def architectures(self) -> list[str]:
        value = self.config.get("architectures") or []
        return [str(name) for name in value] if isinstance(value, list) else []

    @property
    def model_type(self) -> str | None:
        value = self.config.get("model_type")
        return str(value) if value else None

    @property
    def quantization_config(self) -> dict[str, Any] | None:
        """config.json's ``quantization_config`` (a pre-quantized checkpoint), or None."""
        value = self.config.get("quantization_config")
        if value is None:
            return None
        if not isinstance(value, dict):
            raise CheckpointError(f"{self.path}/config.json: quantization_config must be an object")
        return value

    def hf_config(self) -> Any:
        """The transformers config object (rope settings in both spellings normalized)."""
        from transformers import AutoConfig, PretrainedConfig
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        if self.model_type not in CONFIG_MAPPING:  # a model type transformers does not know
            return PretrainedConfig.from_dict(self.config)
        try:
            return AutoConfig.from_pretrained(str(self.path), local_files_only=True)
        except Exception as exc:  # transformers validates the config's values
            detail = " ".join(str(exc).split())[:400]
            raise CheckpointError(
                f"{self.path}/config.json is not a valid {self.model_type} config: {detail}"
            ) from None


def _weight_files(folder: Path) -> tuple[Path, ...]:
    index_path = folder / INDEX_FILE
    if index_path.is_file():
        index = _read_json(index_path)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_path} has no weight_map")
        files = sorted({folder / str(name) for name in weight_map.values()})
        missing = [file.name for file in files if not file.is_file()]
        if missing:
            raise CheckpointError(
                f"{index_path.name} names shard(s) that {folder} lacks: {', '.join(missing[:5])}"
            )
        return tuple(files)
    single = folder / SINGLE_FILE
    if single.is_file():
        return (single,)
    others = sorted(folder.glob("model*.safetensors"))
    if others:
        return tuple(others)
    pickles = sorted({p.name for pattern in PICKLE_PATTERNS for p in folder.glob(pattern)})
    if pickles:
        raise CheckpointError(
            f"{folder} holds PyTorch pickle weights ({', '.join(pickles[:3])}), which tgi-core "
            "never loads implicitly (unpickling can run code); convert them to safetensors "
            f"with: tgi-core convert {folder}"
        )
    raise CheckpointError(f"{folder} has no weights: expected {SINGLE_FILE} or {INDEX_FILE}")
