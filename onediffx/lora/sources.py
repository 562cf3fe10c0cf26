"""Where a LoRA comes from, and reading it without ever unpickling.

A source is a state dict, a local ``.safetensors`` file, a local folder, or a hub id that must
already be in the local Hugging Face cache (onediffx never downloads at load time: a server that
switches LoRAs should not stall on the network, and an offline machine should fail clearly).
Pickle checkpoints (``.bin``, ``.ckpt``, ``.pt``) are refused, because loading one can run code.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch

from .errors import LoraError, LoraFormatError, LoraNotFoundError

Source = Union[str, os.PathLike, Dict[str, torch.Tensor]]

PICKLE_SUFFIXES = {".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle"}
PREFERRED_NAMES = ("pytorch_lora_weights.safetensors", "adapter_model.safetensors")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class RawLora:
    """A LoRA as stored: tensors by key, plus whatever says how to scale them."""

    state_dict: Dict[str, torch.Tensor]
    label: str
    """How messages name it: the file path, the hub id and file, or ``<state dict>``."""
    metadata: Dict[str, str] = field(default_factory=dict)
    """The safetensors header's ``__metadata__`` (diffusers keeps its LoRA config there)."""
    peft_config: Optional[Dict[str, Any]] = None
    """``adapter_config.json`` of a PEFT adapter folder, which holds ``lora_alpha``."""


_CACHE: Dict[Tuple, RawLora] = {}


def clear_cache() -> None:
    """Forget the LoRAs kept by ``use_cache=True`` (their device memory is freed with them)."""
    _CACHE.clear()


def _hub_cache_dir(cache_dir: Optional[str]) -> str:
    from huggingface_hub import constants

    return str(cache_dir or constants.HF_HUB_CACHE)


def _pick_in_folder(folder: Path, weight_name: Optional[str], label: str) -> Path:
    if weight_name:
        path = folder / weight_name
        if not path.is_file():
            raise LoraNotFoundError(f"LoRA {label}: no file {weight_name!r} in {folder}")
        return path
    files = sorted(p for p in folder.iterdir() if p.is_file())
    safe = [p for p in files if p.suffix == ".safetensors"]
    for preferred in PREFERRED_NAMES:
        if folder / preferred in safe:
            return folder / preferred
    if len(safe) == 1:
        return safe[0]
    if len(safe) > 1:
        names = ", ".join(p.name for p in safe[:6])
        raise LoraError(f"LoRA {label}: {folder} holds several .safetensors files ({names}); set weight_name")
    pickles = [p for p in files if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        refuse_pickle(pickles[0])
    raise LoraNotFoundError(f"LoRA {label}: no .safetensors file in {folder}")


def _from_hub_cache(repo_id: str, weight_name: Optional[str], subfolder: Optional[str],
                    cache_dir: Optional[str], revision: Optional[str]) -> Path:
    from huggingface_hub import snapshot_download, try_to_load_from_cache

    where = _hub_cache_dir(cache_dir)
    if weight_name:
        filename = f"{subfolder}/{weight_name}" if subfolder else weight_name
        found = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir, revision=revision)
        if isinstance(found, str):
            return Path(found)
        raise LoraNotFoundError(
            f"LoRA {repo_id} ({filename}) is not in the local Hugging Face cache {where}; "
            f"fetch it with `hf download {repo_id} {filename}` or set source to a local file"
        )
    try:
        folder = Path(snapshot_download(repo_id, cache_dir=cache_dir, revision=revision, local_files_only=True))
    except Exception:  # huggingface_hub raises several types for "not cached"; all mean the same here
        raise LoraNotFoundError(
            f"LoRA {repo_id} is not in the local Hugging Face cache {where}; "
            f"fetch it with `hf download {repo_id}` or set source to a local file"
        ) from None
    return _pick_in_folder(folder / subfolder if subfolder else folder, None, repo_id)


def resolve_file(source: Union[str, os.PathLike], weight_name: Optional[str] = None, *,
                 subfolder: Optional[str] = None, cache_dir: Optional[str] = None,
                 revision: Optional[str] = None) -> Path:
    """The local file a source names; ``LoraNotFoundError`` naming it if there is none."""
    text = str(source)
    path = Path(os.path.expanduser(text))
    if path.is_file():
        return path
    if path.is_dir():
        return _pick_in_folder(path / subfolder if subfolder else path, weight_name, text)
    if _HUB_ID.match(text) and not text.endswith(".safetensors") and not text.startswith("."):
        return _from_hub_cache(text, weight_name, subfolder, cache_dir, revision)
    raise LoraNotFoundError(f"LoRA {text}: no such file or folder")


def refuse_pickle(path: Path) -> None:
    raise LoraFormatError(
        f"LoRA file {path} is a pickle checkpoint; onediffx reads only .safetensors because unpickling can "
        f"run arbitrary code (convert it to safetensors once, in a sandbox)"
    )


def _check_not_pickle(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        refuse_pickle(path)
    with open(path, "rb") as f:
        head = f.read(8)
    # torch.save writes a zip (PK..); plain pickles start with the PROTO opcode 0x80.
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        refuse_pickle(path)


def _read_safetensors(path: Path, device: torch.device) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    from safetensors import safe_open

    _check_not_pickle(path)
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            metadata = dict(f.metadata() or {})
            state_dict = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as e:  # SafetensorError, OSError, header JSON errors: all "unreadable file"
        reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise LoraFormatError(
            f"LoRA file {path} is not a readable safetensors file ({reason}); "
            f"it may be truncated or of another format: download or convert it again"
        ) from None
    if not state_dict:
        raise LoraFormatError(f"LoRA file {path} holds no tensors")
    return state_dict, metadata


def _peft_config_beside(path: Path) -> Optional[Dict[str, Any]]:
    config = path.parent / "adapter_config.json"
    if path.name != "adapter_model.safetensors" or not config.is_file():
        return None
    try:
        return json.loads(config.read_text())
    except (OSError, ValueError) as e:
        raise LoraFormatError(f"LoRA {path}: unreadable {config.name} ({e})") from None


def read_lora(source: Source, device: torch.device, *, weight_name: Optional[str] = None,
              use_cache: bool = False, subfolder: Optional[str] = None, cache_dir: Optional[str] = None,
              revision: Optional[str] = None) -> RawLora:
    """Read a LoRA's tensors straight onto ``device``.

    With ``use_cache`` the result is kept in this process, keyed by the file's identity (path, size,
    modification time) and device, so loading the same LoRA again reads no file.
    """
    if isinstance(source, dict):
        bad = [k for k, v in source.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise LoraFormatError(f"LoRA <state dict>: value of {bad[0]!r} is not a tensor")
        return RawLora({k: v.to(device) for k, v in source.items()}, "<state dict>")
    path = resolve_file(source, weight_name, subfolder=subfolder, cache_dir=cache_dir, revision=revision)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, str(device))
    if use_cache and key in _CACHE:
        return _CACHE[key]
    state_dict, metadata = _read_safetensors(path, device)
    label = str(path) if Path(str(source)).exists() else f"{source} ({path.name})"
    raw = RawLora(state_dict, label, metadata, _peft_config_beside(path))
    if use_cache:
        _CACHE[key] = raw
    return raw
