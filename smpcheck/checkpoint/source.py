"""Resolve what the user named into a local checkpoint directory, or say why not (offline).
What the directory holds is validated by :mod:`smpcheck.checkpoint.inputs`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from smpcheck.checkpoint.demo import demo_checkpoint


class UsageError(ValueError):
    """Bad input: the CLI prints the message as one sentence and exits 2."""


@dataclass(frozen=True)
class ModelSource:
    """A checkpoint on local disk, and what the user called it."""

    name: str
    path: Path


def resolve(model: str | None) -> ModelSource:
    """A directory, a hub id in the local cache, or (None) the built-in demo model."""
    if model is None:
        return ModelSource("built-in demo (tiny Llama)", demo_checkpoint())
    path = Path(model).expanduser()
    if not path.exists():
        path = _from_hub_cache(model)
    if not path.is_dir():
        raise UsageError(f"{path} is a file: pass the model directory that holds config.json "
                         "and the safetensors weights")
    if not (path / "config.json").exists():
        raise UsageError(f"{path} has no config.json: not a Hugging Face model directory")
    return ModelSource(model, path)


def _from_hub_cache(model_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model_id, local_files_only=True))
    except Exception as exc:  # noqa: BLE001 - not found, invalid id, or no cache at all
        raise UsageError(
            f"unknown model {model_id!r}: not a directory, and not in the local Hugging Face "
            "cache (smpcheck runs offline; download it first or pass a path)") from exc
