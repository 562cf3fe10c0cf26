"""InstantID's weights: the face adapter (``ip-adapter.bin``) and the IdentityNet (``ControlNetModel/``).

The published ``ip-adapter.bin`` is a pickle holding two state dicts, ``image_proj`` (the
Resampler) and ``ip_adapter`` (``to_k_ip``/``to_v_ip`` of every UNet cross-attention). It is read
only with ``torch.load(weights_only=True)``, which refuses anything but tensors and containers, or
converted once to safetensors (``python -m onediffx.instantid.convert``), whose flat keys
(``image_proj.<k>``, ``ip_adapter.<k>``) are the layout diffusers' ``load_ip_adapter`` reads too.

``synthetic_face_adapter`` builds the same two state dicts, in the published key layout, with
seeded random values and the real sizes (Resampler width 1280, depth 4, 20 heads of 64, 16 queries,
512-d input, output the UNet's cross-attention width): benchmarks and tests then go through the
same conversion (diffusers' ``IPAdapterPlusImageProjection``) as the real checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from ..errors import ConfigError, NotFoundError

ADAPTER_FILES = ("ip-adapter.safetensors", "ip-adapter.bin")
CONTROLNET_FOLDER = "ControlNetModel"
PARTS = ("image_proj", "ip_adapter")

RESAMPLER = dict(hidden=1280, depth=4, heads=20, dim_head=64, queries=16, embed_dim=512, ff_mult=4)
"""InstantID's published Resampler (``ip_adapter.resampler.Resampler`` as its pipeline builds it)."""


def split_flat(flat: dict[str, torch.Tensor], where: str) -> dict[str, dict[str, torch.Tensor]]:
    """``{"image_proj.k": v, "ip_adapter.k": v}`` as the two nested state dicts."""
    nested: dict[str, dict[str, torch.Tensor]] = {part: {} for part in PARTS}
    for key, value in flat.items():
        part, _, rest = key.partition(".")
        if part not in nested or not rest:
            raise ConfigError(f"{where}: key {key!r} is neither image_proj.* nor ip_adapter.*; not an InstantID face adapter")
        nested[part][rest] = value
    return nested


def flatten(nested: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {f"{part}.{key}": value.contiguous() for part in PARTS for key, value in nested[part].items()}


def read_face_adapter(path: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """The ``image_proj`` and ``ip_adapter`` state dicts of an InstantID face adapter file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise NotFoundError(f"model.instantid: face adapter {str(path)!r} does not exist; "
                            f"expected {' or '.join(ADAPTER_FILES)}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        nested = split_flat(load_file(str(path)), str(path))
    elif path.suffix in (".bin", ".pt", ".pth"):
        try:
            loaded = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as err:  # the unpickler refuses anything that is not plain tensors and containers
            raise ConfigError(f"model.instantid: {str(path)!r} is not a weights-only checkpoint "
                              f"({str(err).splitlines()[0][:120]}); it is not loaded") from err
        if not isinstance(loaded, dict) or not all(isinstance(loaded.get(p), dict) for p in PARTS):
            raise ConfigError(f"model.instantid: {str(path)!r} holds no image_proj and ip_adapter state dicts")
        nested = {part: dict(loaded[part]) for part in PARTS}
    else:
        raise ConfigError(f"model.instantid: {str(path)!r} is neither .safetensors nor .bin")
    if not nested["image_proj"] or not nested["ip_adapter"]:
        raise ConfigError(f"model.instantid: {str(path)!r} has an empty image_proj or ip_adapter part")
    return nested


def convert(source: str | Path, target: str | Path) -> Path:
    """Write the face adapter ``source`` (``.bin``) as ``target`` (``.safetensors``), atomically."""
    from safetensors.torch import save_file

    nested = read_face_adapter(source)
    target = Path(target).expanduser()
    tmp = target.with_name(target.name + ".tmp")
    save_file(flatten(nested), str(tmp), metadata={"format": "pt", "source": Path(source).name})
    tmp.replace(target)
    return target


def _local_folder(source: str) -> Optional[Path]:
    """``source`` as a local folder: itself, or its snapshot in the local Hugging Face cache."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if "/" not in source or source.count("/") > 1:
        return None
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source, local_files_only=True))
    except Exception:  # huggingface_hub raises several types for "not cached"; all mean the same here
        return None


def instantid_folder(source: str) -> Path:
    """The folder holding ``ControlNetModel/`` and the face adapter, or one line saying how to get it."""
    folder = _local_folder(source)
    if folder is None:
        raise NotFoundError(f"model.instantid: {source!r} is neither a local folder nor in the local Hugging Face cache; "
                            f"download it with `hf download {source}`, or run with model.synthetic=true for benchmarks")
    return folder


def adapter_file(folder: Path) -> Path:
    """The face adapter in ``folder``: the safetensors conversion when present, else the ``.bin``."""
    for name in ADAPTER_FILES:
        if (folder / name).is_file():
            return folder / name
    raise NotFoundError(f"model.instantid: no {' or '.join(ADAPTER_FILES)} in {str(folder)!r}")


def load_identitynet(source: str, dtype: torch.dtype) -> Any:
    """The IdentityNet: the ``ControlNetModel`` folder of an InstantID checkpoint (safetensors only)."""
    from diffusers import ControlNetModel

    folder = instantid_folder(source) / CONTROLNET_FOLDER
    if not folder.is_dir():
        raise NotFoundError(f"model.instantid: {source!r} has no {CONTROLNET_FOLDER}/ folder")
    return ControlNetModel.from_pretrained(str(folder), torch_dtype=dtype, local_files_only=True, use_safetensors=True)


def _cross_attention_widths(unet: Any) -> list[int]:
    """The width of each cross-attention processor, in the order ``ip_adapter`` keys number them."""
    channels = list(unet.config.block_out_channels)
    widths = []
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        if name.startswith("mid_block"):
            widths.append(channels[-1])
        elif name.startswith("up_blocks"):
            widths.append(channels[::-1][int(name[len("up_blocks.")])])
        else:
            widths.append(channels[int(name[len("down_blocks.")])])
    return widths


def synthetic_face_adapter(unet: Any, *, seed: int = 0, device: Any = "cpu", dtype: torch.dtype = torch.float32,
                           **sizes: int) -> dict[str, dict[str, torch.Tensor]]:
    """A face adapter with seeded random weights in the published layout, sized for ``unet``.

    ``sizes`` override ``RESAMPLER`` (the built-in tiny model uses a narrow Resampler).
    """
    s = {**RESAMPLER, **sizes}
    gen = torch.Generator(device).manual_seed(seed)
    hidden, inner, out = s["hidden"], s["heads"] * s["dim_head"], unet.config.cross_attention_dim

    def linear(rows: int, cols: int) -> torch.Tensor:
        return (torch.randn(rows, cols, generator=gen, device=device) * cols ** -0.5).to(dtype)

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, device=device, dtype=dtype)

    def zeros(n: int) -> torch.Tensor:
        return torch.zeros(n, device=device, dtype=dtype)

    proj = {
        "latents": (torch.randn(1, s["queries"], hidden, generator=gen, device=device) * hidden ** -0.5).to(dtype),
        "proj_in.weight": linear(hidden, s["embed_dim"]), "proj_in.bias": zeros(hidden),
        "proj_out.weight": linear(out, hidden), "proj_out.bias": zeros(out),
        "norm_out.weight": ones(out), "norm_out.bias": zeros(out),
    }
    for i in range(s["depth"]):
        p = f"layers.{i}."
        proj.update({
            p + "0.norm1.weight": ones(hidden), p + "0.norm1.bias": zeros(hidden),
            p + "0.norm2.weight": ones(hidden), p + "0.norm2.bias": zeros(hidden),
            p + "0.to_q.weight": linear(inner, hidden), p + "0.to_kv.weight": linear(2 * inner, hidden),
            p + "0.to_out.weight": linear(hidden, inner),
            p + "1.0.weight": ones(hidden), p + "1.0.bias": zeros(hidden),
            p + "1.1.weight": linear(hidden * s["ff_mult"], hidden), p + "1.3.weight": linear(hidden, hidden * s["ff_mult"]),
        })
    ip = {}
    for n, width in enumerate(_cross_attention_widths(unet)):
        key = 2 * n + 1  # the published numbering counts every processor, self-attention ones included
        ip[f"{key}.to_k_ip.weight"] = linear(width, out)
        ip[f"{key}.to_v_ip.weight"] = linear(width, out)
    return {"image_proj": proj, "ip_adapter": ip}


def seed_zero_convolutions(controlnet: Any, seed: int = 0, gain: float = 0.5) -> None:
    """Seeded values for the IdentityNet's output convolutions, which ``ControlNetModel.from_unet`` zeroes.

    The published IdentityNet's are trained and non-zero; left at zero, a synthetic or built-in
    IdentityNet would add nothing, and tests or fidelity figures would never see its residuals.
    """
    convs = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]
    weight = convs[0].weight
    gen = torch.Generator(weight.device).manual_seed(seed)
    with torch.no_grad():
        for conv in convs:
            fan_in = conv.weight[0].numel()
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen, device=weight.device) * gain * fan_in ** -0.5)
