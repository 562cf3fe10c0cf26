"""Where a LoRA comes from, and reading it without ever unpickling.

A source is a state dict, a local ``.safetensors`` file, a local folder, or a hub id that must
already be in the local Hugging Face cache (onediffx never downloads at load time: a server that
switches LoRAs should not stall on the network, and an offline machine should fail clearly).
Pickle checkpoints (``.bin``, ``.ckpt``, ``.pt``) are refused, because loading one can run code.
"""

from __future__ import annotations

import math
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch

from ..bounded import BoundedInputError, parse_json, read_json
from ..device import free_memory
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
        head = f.read(9)
    # torch.save writes a zip (PK..); plain pickles start with the PROTO opcode 0x80. A safetensors
    # file starts with its header's length, whose first byte can be anything (0x80 for one header
    # size in 256), and then the header's "{": that settles it.
    if (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80") and head[8:9] != b"{":
        refuse_pickle(path)


_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
MAX_HEADER = 100 * 2**20
"""The safetensors library's own limit on the JSON header."""
MAX_PEFT_CONFIG = 2**20
"""A PEFT ``adapter_config.json`` is a few hundred bytes of settings; a megabyte is not one."""
CHUNK = 16 * 2**20
"""Bytes per staging copy to a GPU: two pinned buffers this size are reused, one filling while one copies."""


@dataclass
class _Entry:
    """One tensor of a safetensors header: where its bytes lie in the data section."""

    key: str
    dtype: torch.dtype
    shape: Tuple[int, ...]
    begin: int
    end: int

    @property
    def on_host(self) -> bool:
        """Scalars (kohya's ``.alpha``) stay on the CPU: ``.item()`` of a GPU tensor waits for the GPU."""
        return math.prod(self.shape) == 1


class _Unreadable(Exception):
    """A header that breaks the safetensors format; its message is the reason shown to the user."""


def _parse_header(raw: bytes, data_size: int) -> Tuple[List[_Entry], Dict[str, str]]:
    """The tensors (by offset) and ``__metadata__`` of a header, checked so no view can leave the file."""
    try:
        header = parse_json(raw, "header", dict, max_bytes=MAX_HEADER)
    except BoundedInputError as err:
        raise _Unreadable(str(err)) from None
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _Unreadable("__metadata__ is not a map of strings")
    entries = []
    for key, info in header.items():
        try:
            dtype, shape, (begin, end) = _DTYPES.get(info["dtype"]), tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise _Unreadable(f"bad header entry for {key!r}") from None
        if dtype is None:
            raise _Unreadable(f"{key!r} has unsupported dtype {info['dtype']!r}")
        numbers = (*shape, begin, end)
        if set(map(type, numbers)) != {int} or min(numbers) < 0:  # no bools, floats or negatives
            raise _Unreadable(f"bad shape or offsets for {key!r}")
        if max(shape, default=0) > data_size:  # no dimension can be longer than the file (2^64 with a 0 beside it)
            raise _Unreadable(f"{key!r} has a dimension of {max(shape)}, longer than the file")
        if end - begin != math.prod(shape) * dtype.itemsize or begin > end:
            raise _Unreadable(f"{key!r} has {end - begin} bytes for shape {list(shape)}")
        if end > data_size:
            raise _Unreadable(f"{key!r} ends at byte {end} of a {data_size}-byte data section")
        entries.append(_Entry(key, dtype, shape, begin, end))
    _check_tiling(entries, data_size)
    return entries, metadata


def _check_tiling(entries: List[_Entry], data_size: int) -> None:
    """Tensors tile the data section exactly, in offset order, as the safetensors library requires:
    overlapping tensors would alias each other's bytes, and a gap hides data no tensor accounts for."""
    position = 0
    for entry in sorted(entries, key=lambda e: (e.begin, e.end)):
        if entry.begin != position:
            what = "overlaps the tensor before it" if entry.begin < position else "leaves a gap before it"
            raise _Unreadable(f"{entry.key!r} at byte {entry.begin} {what}")
        position = entry.end
    if position != data_size:
        raise _Unreadable(f"the tensors end at byte {position} of a {data_size}-byte data section")


def _fill(f: Any, buffer: torch.Tensor) -> None:
    """Read exactly ``buffer.numel()`` bytes from ``f`` into a CPU uint8 tensor."""
    view = memoryview(buffer.numpy()).cast("B")
    done = 0
    while done < len(view):
        n = f.readinto(view[done:])
        if not n:
            raise _Unreadable("file ends inside the data")
        done += n


def _stage_to_gpu(f: Any, data: torch.Tensor, host: List[_Entry]) -> Dict[str, torch.Tensor]:
    """Fill the GPU buffer ``data`` from ``f`` through two reused pinned buffers; return ``host`` entries.

    One copy per chunk replaces one synchronous copy per tensor (a LoRA has thousands), and reading
    the next chunk overlaps copying this one. Host entries are cut out of the pinned chunk they are in.
    """
    stream = torch.cuda.current_stream(data.device)
    size = data.numel()
    slots = [torch.empty(min(CHUNK, size), dtype=torch.uint8, pin_memory=True) for _ in range(2)]
    copied: List[Optional[torch.cuda.Event]] = [None, None]
    found: Dict[str, torch.Tensor] = {}
    pending = sorted(host, key=lambda e: e.begin)
    for i, start in enumerate(range(0, size, CHUNK)):
        n, slot = min(CHUNK, size - start), slots[i % 2]
        if copied[i % 2] is not None:
            copied[i % 2].synchronize()  # this pinned buffer's last copy is done: safe to overwrite
        _fill(f, slot[:n])
        while pending and pending[0].begin < start + n:
            entry = pending.pop(0)
            if entry.end <= start + n:  # else it straddles two chunks (misaligned): a view of ``data``
                found[entry.key] = _tensor(slot[entry.begin - start:entry.end - start].clone(), {}, entry, 0)
        data[start:start + n].copy_(slot[:n], non_blocking=True)
        copied[i % 2] = stream.record_event()
    return found


def _tensor(data: torch.Tensor, typed: Dict[torch.dtype, torch.Tensor], entry: _Entry, begin: int) -> torch.Tensor:
    """``entry`` as a view of the uint8 buffer ``data``, whose byte ``begin`` is the entry's first byte.

    ``typed`` caches ``data`` viewed as each dtype, so an aligned entry costs one slice and one view.
    """
    size = entry.dtype.itemsize
    if begin % size or data.numel() % size:  # misaligned (no safetensors writer does this): copy it
        return data[begin:begin + entry.end - entry.begin].clone().view(entry.dtype).view(entry.shape)
    if entry.dtype not in typed:
        typed[entry.dtype] = data.view(entry.dtype)
    start = begin // size
    return typed[entry.dtype][start:start + (entry.end - entry.begin) // size].view(entry.shape)


def _read_safetensors(path: Path, device: torch.device) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """All tensors of a safetensors file, read in one pass into one buffer on ``device``.

    safetensors' ``load_file`` copies each tensor to the GPU on its own, a synchronous copy of a few
    microseconds each; here the file goes over in a few large copies and each tensor is a view.
    Scalars stay on the CPU (see ``_Entry.on_host``).
    """
    _check_not_pickle(path)
    try:
        with open(path, "rb", buffering=0) as f:
            state_dict, metadata = _read_open(f, os.fstat(f.fileno()).st_size, device)
    except (_Unreadable, OSError) as e:
        reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise LoraFormatError(
            f"LoRA file {path} is not a readable safetensors file ({reason}); "
            f"it may be truncated or of another format: download or convert it again"
        ) from None
    if not state_dict:
        raise LoraFormatError(f"LoRA file {path} holds no tensors")
    _check_finite(state_dict, str(path))
    return state_dict, metadata


def _check_finite(state_dict: Dict[str, torch.Tensor], label: str) -> None:
    """Refuse NaN or Inf factors now: fused, they turn every image black while reporting success.

    One fused max-abs over all tensors per device (``get_total_norm`` with ``foreach``) costs a few
    kernels, not one per tensor; only a file that fails is searched tensor by tensor for the message.
    """
    from torch.nn.utils import get_total_norm

    floats = [t for t in state_dict.values() if t.is_floating_point() and t.numel()]
    by_device: Dict[torch.device, List[torch.Tensor]] = {}
    for t in floats:
        by_device.setdefault(t.device, []).append(t)
    if all(math.isfinite(float(get_total_norm(ts, norm_type=math.inf, foreach=True))) for ts in by_device.values()):
        return
    bad = next(k for k, t in state_dict.items() if t.is_floating_point() and not bool(torch.isfinite(t).all()))
    raise LoraFormatError(f"LoRA {label}: tensor {bad!r} holds NaN or Inf values; the file is damaged: "
                          "download or train it again")


def _read_open(f: Any, file_size: int, device: torch.device) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    head = f.read(8)
    if len(head) < 8:
        raise _Unreadable("shorter than a header")
    (length,) = struct.unpack("<Q", head)
    if length > min(MAX_HEADER, file_size - 8):
        raise _Unreadable(f"header length {length} does not fit the {file_size}-byte file")
    raw = f.read(length)
    if len(raw) < length:
        raise _Unreadable("file ends inside the header")
    entries, metadata = _parse_header(raw, file_size - 8 - length)
    if not entries:
        return {}, metadata
    size = max(e.end for e in entries)
    # Padded to 8 bytes so the buffer can be viewed as any dtype; the padding is never read.
    padded = (size + 7) // 8 * 8
    free = free_memory(device)
    if padded > free:  # a header may declare any size (a sparse file): refuse before allocating it
        raise _Unreadable(f"its tensors take {padded / 2**30:.1f} GiB, more than the {free / 2**30:.1f} GiB free on {device}")
    host: Dict[str, torch.Tensor] = {}
    if device.type == "cuda":
        data = torch.empty(padded, dtype=torch.uint8, device=device)
        host = _stage_to_gpu(f, data[:size], [e for e in entries if e.on_host])
    else:
        data = torch.empty(padded, dtype=torch.uint8)
        _fill(f, data[:size])
        if device.type != "cpu":
            host = {e.key: _tensor(data, {}, e, e.begin).clone() for e in entries if e.on_host}
            data = data.to(device)
    typed: Dict[torch.dtype, torch.Tensor] = {}
    return {e.key: host[e.key] if e.key in host else _tensor(data, typed, e, e.begin) for e in entries}, metadata


def _peft_config_beside(path: Path) -> Optional[Dict[str, Any]]:
    config = path.parent / "adapter_config.json"
    if path.name != "adapter_model.safetensors" or not config.is_file():
        return None
    try:
        return read_json(config, dict, max_bytes=MAX_PEFT_CONFIG, where=f"LoRA {path}: {config.name}")
    except BoundedInputError as err:
        raise LoraFormatError(str(err)) from None


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
        _check_finite(source, "<state dict>")
        # Scalars (alphas) stay where they are: see _Entry.on_host.
        return RawLora({k: v if v.numel() == 1 else v.to(device) for k, v in source.items()}, "<state dict>")
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
