"""LoRA file formats → one canonical form: ``(component, module path) → LoraLayer``.

Key renaming is diffusers' own (kohya/A1111 and SGM block names, old attention-processor names,
``.lora.down``/``lora_linear_layer``, PEFT ``lora_A``/``lora_B``), so onediffx reads exactly what
diffusers reads. What diffusers does not give back in a usable form is written here: the alpha of
each layer. diffusers turns kohya alphas into a PEFT config whose patterns miss per-layer values of
attention layers; onediffx keeps the alpha stored with each layer, by following the tensor objects
through diffusers' renaming (renaming moves tensors, it never copies them).
"""

from __future__ import annotations

import inspect
import math
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch

from ..bounded import BoundedInputError, parse_json
from .errors import LoraFormatError
from .families import check_family
from .sources import MAX_HEADER, RawLora

TargetKey = Tuple[str, str]
"""(pipeline component such as ``unet`` or ``text_encoder_2``, module path inside it)."""

KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
SGM_PATTERNS = ("input_blocks", "middle_block", "output_blocks")
PEFT_WRAPPER_PREFIX = "base_model.model."
_UNSUPPORTED = {
    "dora_scale": "DoRA", "lora_magnitude_vector": "DoRA", "hada_w": "LyCORIS LoHa", "lokr_w": "LyCORIS LoKr",
    "lora_mid": "LoCon with CP/Tucker decomposition", ".diff": "full-weight difference", "oft_": "OFT",
}
_PEFT_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[A-Za-z0-9_-]+)?\.(?P<kind>weight|bias)$")


@dataclass
class LoraLayer:
    """One layer's low-rank update: ``delta = scale * up @ down`` (conv kernels flattened)."""

    down: torch.Tensor
    """(rank, in) for linear layers, (rank, in, kh, kw) for convolutions."""
    up: torch.Tensor
    """(out, rank), or (out, rank, 1, 1) for convolutions."""
    scale: float
    """alpha / rank (alpha / sqrt(rank) for rsLoRA)."""

    @property
    def rank(self) -> int:
        return self.down.shape[0]


_COMPONENT = re.compile(r"^(unet|transformer|text_encoder(_\d)?|prior|decoder)\.")


def _component_of(key: str) -> Optional[str]:
    """The pipeline component a diffusers-format key is prefixed with (``None`` for bare PEFT keys)."""
    match = _COMPONENT.match(key)
    return match[1] if match else None


def _check_supported(state_dict: Dict[str, torch.Tensor], label: str) -> None:
    # One substring search per marker over all keys at once; the per-key loop below, which names
    # the first offending key, runs only when some marker occurs at all.
    keys = "\n".join(state_dict) + "\n"
    if not any(marker in keys for marker in (*_UNSUPPORTED, "lora_up.bias\n", "lora_B.bias\n")):
        return
    for key in state_dict:
        for marker, what in _UNSUPPORTED.items():
            if marker in key:
                raise LoraFormatError(
                    f"LoRA {label}: {what} layers ({key!r}) are not supported; only plain LoRA/LoCon can be fused"
                )
        if key.endswith(("lora_up.bias", "lora_B.bias")):
            raise LoraFormatError(f"LoRA {label}: LoRA biases ({key!r}) are not supported")


def _kohya_to_diffusers(state_dict: Dict[str, torch.Tensor], label: str, unet_config: Any
                        ) -> Tuple[Dict[str, torch.Tensor], Dict[int, float]]:
    """Rename kohya keys with diffusers' converter; return alphas keyed by the down tensor's id."""
    from diffusers.loaders.lora_conversion_utils import (
        _convert_non_diffusers_lora_to_diffusers,
        _maybe_map_sgm_blocks_to_diffusers,
    )

    alphas: Dict[int, float] = {}
    state_dict = dict(state_dict)  # diffusers pops from it
    for key, value in state_dict.items():
        if key.endswith(".lora_down.weight"):
            name = key[: -len(".lora_down.weight")]
            if name + ".lora_up.weight" not in state_dict:
                raise LoraFormatError(f"LoRA {label}: {name}.lora_down.weight has no matching lora_up.weight")
            alpha = state_dict.get(name + ".alpha")
            if alpha is not None:
                alphas[id(value)] = float(alpha.item())
        elif not key.endswith((".lora_up.weight", ".alpha")):
            raise LoraFormatError(f"LoRA {label}: unrecognised kohya key {key!r}")
    try:
        if any(p in key for key in state_dict for p in SGM_PATTERNS):
            if unet_config is None:
                raise LoraFormatError(f"LoRA {label}: SGM-named UNet layers but the pipeline has no UNet")
            state_dict = _maybe_map_sgm_blocks_to_diffusers(state_dict, unet_config)
        converted, _ = _convert_non_diffusers_lora_to_diffusers(state_dict)
    except (ValueError, KeyError, IndexError) as e:
        first = str(e).strip().splitlines()[-1][:160]
        raise LoraFormatError(f"LoRA {label}: kohya keys diffusers cannot map ({first})") from None
    return converted, alphas


def _to_peft_names(component: str, state_dict: Dict[str, torch.Tensor], module: Optional[torch.nn.Module]
                   ) -> Dict[str, torch.Tensor]:
    """The renaming diffusers applies before handing a component's LoRA to PEFT."""
    from diffusers.utils.state_dict_utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    if component.startswith("text_encoder"):
        for convert in (convert_state_dict_to_diffusers, convert_state_dict_to_peft):
            try:
                state_dict = convert(state_dict)
            except ValueError:  # "could not infer the type": already in the other convention
                pass
        if module is not None and not hasattr(module, "text_model"):
            state_dict = {k.removeprefix("text_model."): v for k, v in state_dict.items()}
        return state_dict
    if not all(".lora_A" in k or ".lora_B" in k for k in state_dict):
        state_dict = convert_unet_state_dict_to_peft(state_dict)
    return state_dict


def _lora_configs(raw: RawLora) -> Dict[Optional[str], Dict[str, Any]]:
    """PEFT ``LoraConfig`` fields per component prefix (``None``: an unprefixed PEFT adapter)."""
    configs: Dict[Optional[str], Dict[str, Any]] = {}
    if raw.peft_config:
        configs[None] = raw.peft_config
    text = raw.metadata.get("lora_adapter_metadata")
    if text:
        try:
            flat = parse_json(text, f"LoRA {raw.label}: lora_adapter_metadata in the file header", dict,
                              max_bytes=MAX_HEADER)
        except BoundedInputError as err:
            raise LoraFormatError(str(err)) from None
        for key, value in flat.items():
            prefix, _, field = key.partition(".")
            if field:
                configs.setdefault(prefix, {})[field] = value
            else:
                configs.setdefault(None, {})[key] = value
    for config in configs.values():
        _check_config(config, raw.label)
    return configs


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_config(config: Any, label: str) -> None:
    """The fields ``_config_scale`` reads, typed: a string alpha or a list of patterns in a hostile
    header would otherwise be a ``TypeError`` deep in the scale arithmetic."""
    if not isinstance(config, dict):
        raise LoraFormatError(f"LoRA {label}: its LoRA config is {type(config).__name__}, not an object")
    alpha, patterns = config.get("lora_alpha", 8), config.get("alpha_pattern") or {}
    if not _is_number(alpha):
        raise LoraFormatError(f"LoRA {label}: lora_alpha {str(alpha)[:40]!r} is not a finite number")
    if not isinstance(patterns, dict) or not all(_is_number(v) for v in patterns.values()):
        raise LoraFormatError(f"LoRA {label}: alpha_pattern is not a map of module patterns to finite numbers")


def _config_scale(config: Dict[str, Any], module: str, rank: int) -> float:
    from peft.utils.other import get_pattern_key

    patterns = config.get("alpha_pattern") or {}
    alpha = patterns.get(get_pattern_key(list(patterns), module), config.get("lora_alpha", 8))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _split_components(state_dict: Dict[str, torch.Tensor], default: Optional[str]
                      ) -> Dict[str, Dict[str, torch.Tensor]]:
    groups: Dict[str, Dict[str, torch.Tensor]] = {}
    prefixed = any(_component_of(k) for k in state_dict)
    for key, value in state_dict.items():
        component = _component_of(key) if prefixed else default
        if component is None:
            component, rest = "", key
        else:
            rest = key[len(component) + 1:] if prefixed else key
        groups.setdefault(component, {})[rest] = value
    return groups


def to_canonical(raw: RawLora, components: Dict[str, torch.nn.Module], unet_config: Any = None,
                 pipeline_class: Optional[type] = None) -> Dict[TargetKey, LoraLayer]:
    """Every layer of ``raw`` under its target module; ``LoraFormatError`` for anything unreadable.

    ``components`` are the pipeline's LoRA-capable modules by name; they are consulted only for
    naming conventions (text encoders with or without ``text_model``), not to check shapes, which
    ``fit`` does. A pipeline whose denoiser is a transformer (FLUX, SD3) has its file's keys renamed
    by ``pipeline_class.lora_state_dict``, diffusers' own choice of converter for that pipeline.
    """
    label = raw.label
    _check_supported(raw.state_dict, label)
    check_family(raw.state_dict, components, label)
    state_dict = {k.removeprefix(PEFT_WRAPPER_PREFIX): v for k, v in raw.state_dict.items()}
    alphas: Dict[int, float] = {}
    is_kohya = [k.startswith(KOHYA_PREFIXES) for k in state_dict]
    if "transformer" in components and "unet" not in components:
        state_dict = _transformer_to_diffusers(state_dict, label, pipeline_class, components)
        alphas = _diffusers_alphas(state_dict)
    elif all(is_kohya):
        state_dict, alphas = _kohya_to_diffusers(state_dict, label, unet_config)
    elif any(is_kohya):
        raise LoraFormatError(f"LoRA {label}: mixes kohya keys (lora_unet_*, lora_te*) with other naming")
    else:
        alphas = _diffusers_alphas(state_dict)
    default = "unet" if "unet" in components or "transformer" not in components else "transformer"
    configs = _lora_configs(raw)
    layers: Dict[TargetKey, LoraLayer] = {}
    for component, part in _split_components(state_dict, default).items():
        if not component:
            raise LoraFormatError(f"LoRA {label}: key {next(iter(part))!r} names no pipeline component")
        part = _to_peft_names(component, part, components.get(component))
        config = configs.get(component) or configs.get(None)
        for module, (down, up) in _pair(part, component, label).items():
            if up.shape[1] != down.shape[0]:
                raise LoraFormatError(
                    f"LoRA {label}: {component}.{module} has up {tuple(up.shape)} and down {tuple(down.shape)} "
                    f"of different ranks"
                )
            if up.dim() == 4 and up.shape[2:] != (1, 1):
                raise LoraFormatError(f"LoRA {label}: {component}.{module} has a {tuple(up.shape)} up kernel")
            rank = down.shape[0]
            if id(down) in alphas:
                scale = alphas[id(down)] / rank
            elif config is not None:
                scale = _config_scale(config, module, rank)
            else:
                scale = 1.0  # diffusers/PEFT convention without stored alpha: alpha == rank
            layers[(component, module)] = LoraLayer(down, up, scale)
    if not layers:
        raise LoraFormatError(f"LoRA {label}: holds no LoRA layers")
    return layers


_CONVERTER_ERRORS = (ValueError, KeyError, IndexError, AssertionError, NotImplementedError, TypeError, RuntimeError)
"""What diffusers' converters raise on keys they cannot map (an ``assert`` checks FLUX.1's layer sizes)."""


def _transformer_to_diffusers(state_dict: Dict[str, torch.Tensor], label: str, pipeline_class: Optional[type],
                              components: Dict[str, torch.nn.Module]) -> Dict[str, torch.Tensor]:
    """diffusers-format keys for a transformer pipeline's LoRA, with stored alphas as ``<module>.alpha``.

    ``FluxPipeline.lora_state_dict`` picks diffusers' kohya, XLabs or diffusers path by the keys and
    bakes kohya alphas into the factors; ``StableDiffusion3Pipeline``'s takes diffusers format as it
    is. Given a dict, it reads no file. Two things are done around it: the text-encoder half of its
    kohya path scales factors in place (``*=``), so those tensors are copies here, not the file's
    (which ``use_cache`` keeps for the next load); and keys it leaves without a component prefix
    (FLUX's ``img_in``, ``txt_in``, ``time_in``, ``final_layer``) name transformer modules, so they
    get the ``transformer.`` prefix, where diffusers' own loader drops them.
    """
    convert = getattr(pipeline_class, "lora_state_dict", None)
    if convert is None:
        return state_dict
    state_dict = {k: v.clone() if k.startswith("lora_te") else v for k, v in state_dict.items()}
    kwargs = {"return_alphas": True} if "return_alphas" in inspect.signature(convert).parameters else {}
    try:
        out = convert(state_dict, **kwargs)
    except _CONVERTER_ERRORS as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[-1][:160]
        if isinstance(e, AssertionError):  # a fused layer split at the full-size model's widths
            reason = "its layer sizes are not the ones diffusers' converter assumes; made for another base model?"
        raise LoraFormatError(
            f"LoRA {label}: diffusers' {pipeline_class.__name__}.lora_state_dict cannot convert its keys ({reason})"
        ) from None
    converted, alphas = (out if kwargs else (out, None))
    converted = dict(converted)
    left = next((k for k in converted if k.startswith(("lora_unet_", "lora_transformer_", "lora_te"))), None)
    if left is not None:
        from diffusers import __version__ as diffusers_version

        raise LoraFormatError(
            f"LoRA {label}: kohya-named keys (e.g. {left!r}) that diffusers {diffusers_version} has no converter "
            f"for on {pipeline_class.__name__}; save it in diffusers format (transformer.<module>.lora_A/lora_B)"
        )
    for key, alpha in (alphas or {}).items():
        converted[key] = alpha if isinstance(alpha, torch.Tensor) else torch.tensor(float(alpha))
    if any(_component_of(k) for k in converted):
        transformer = components["transformer"]
        for key in [k for k in converted if _component_of(k) is None]:
            module = key.split(".lora_", 1)[0].removesuffix(".alpha")
            if _has_module(transformer, module):
                converted["transformer." + key] = converted.pop(key)
    return converted


def _has_module(root: torch.nn.Module, path: str) -> bool:
    try:
        root.get_submodule(path)
    except AttributeError:
        return False
    return True


def _diffusers_alphas(state_dict: Dict[str, torch.Tensor]) -> Dict[int, float]:
    """``<module>.alpha`` entries some diffusers-format files carry, keyed by the down tensor's id."""
    alphas: Dict[int, float] = {}
    for key in [k for k in state_dict if k.endswith(".alpha")]:
        module = key[: -len(".alpha")]
        alpha = float(state_dict.pop(key).item())
        for down_suffix in (".lora.down.weight", ".lora_A.weight", ".lora_linear_layer.down.weight",
                            "_lora.down.weight"):
            down = state_dict.get(module + down_suffix)
            if down is not None:
                alphas[id(down)] = alpha
    return alphas


def _pair(state_dict: Dict[str, torch.Tensor], component: str, label: str
          ) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    found: Dict[str, Dict[str, torch.Tensor]] = {}
    unknown: List[str] = []
    for key, value in state_dict.items():
        match = _PEFT_KEY.match(key)
        if match is None or match["kind"] != "weight":
            unknown.append(key)
            continue
        found.setdefault(match["module"], {})[match["ab"]] = value
    if unknown:
        raise LoraFormatError(
            f"LoRA {label}: {len(unknown)} key(s) of {component} are not LoRA weights, e.g. {unknown[0]!r}"
        )
    pairs = {}
    for module, ab in found.items():
        if set(ab) != {"A", "B"}:
            raise LoraFormatError(f"LoRA {label}: {component}.{module} lacks its lora_{'B' if 'A' in ab else 'A'}")
        pairs[module] = (ab["A"], ab["B"])
    return pairs
