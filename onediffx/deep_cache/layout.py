"""Where a DeepCache branch sits in a UNet, and which modules its shallow pass replays.

Every way of naming a DeepCache branch comes down to one number, the *skip index* ``k``: the
position, in the UNet's ``down_block_res_samples`` (``conv_in`` output first, then each down block's
resnet outputs and its downsampler output), of the deepest skip connection that a shallow step still
recomputes. Everything whose input depends on deeper features is replayed from the last full step.
Naming schemes in use:

* onediffx / OneDiffX / DeepCache's pipelines: ``cache_layer_id`` = down block ``L``,
  ``cache_block_id`` = output ``B`` inside it (resnet ``B``, or its downsampler when ``B`` equals the
  number of resnets): ``k = 1 + (skip outputs of down blocks before L) + B``.
  For SD/SDXL (2 resnets + 1 downsampler per block) that is ``k = 3 * L + B + 1``.
* ``DeepCache.DeepCacheSDHelper.set_params(cache_branch_id=n)``: ``k = n`` (its ``n % 3`` / ``n // 3``
  split is the up block and resnet counted from the output end, which assumes 3 resnets per up block).
  So OneDiffX's default ``cache_layer_id=0, cache_block_id=0`` is the helper's ``cache_branch_id=1``.
* SVD's ``cache_branch=b`` (DeepCache's SVD pipeline, which never uses the ``conv_in`` branch): ``k = b + 1``.

Working from ``k`` on the model's real block structure (not from a fixed table) is what lets one
implementation serve SD 1.5/2.1, SDXL, ControlNet and SVD UNets.
"""

from __future__ import annotations

from typing import Any, Optional

from torch import nn

from ..errors import ConfigError

SUPPORTED_UNETS = ("UNet2DConditionModel", "UNetSpatioTemporalConditionModel")
"""Denoiser classes whose forward is the down/mid/up-block UNet that DeepCache's branches assume."""


def unwrap(module: nn.Module) -> nn.Module:
    """The module itself when it was wrapped by ``torch.compile`` (hooks go on the real module)."""
    return getattr(module, "_orig_mod", module)


def pipeline_unet(pipe: Any) -> nn.Module:
    """The pipeline's UNet, or a ``ConfigError`` of one line when DeepCache cannot apply to it."""
    from ..denoiser import denoiser_name

    name = type(pipe).__name__
    denoiser = getattr(pipe, "unet", None)
    if denoiser_name(pipe) == "transformer":
        raise ConfigError(
            f"deepcache: works on UNets; {name}'s denoiser is {type(unwrap(pipe.transformer)).__name__}: "
            "for transformers use stepcache=fbc|taylorseer|magcache, with deepcache=off"
        )
    if denoiser is None:
        raise ConfigError(
            f"deepcache: {name} is not supported (it has no UNet); DeepCache needs a UNet pipeline "
            f"({' or '.join(SUPPORTED_UNETS)}: SD 1.5/2.1, SDXL, ControlNet, SVD); run with deepcache=off"
        )
    unet = unwrap(denoiser)
    if type(unet).__name__ not in SUPPORTED_UNETS or not _has_unet_layout(unet):
        raise ConfigError(
            f"deepcache: {name} is not supported (its UNet is {type(unet).__name__}); DeepCache supports "
            f"{' and '.join(SUPPORTED_UNETS)} pipelines; run with deepcache=off"
        )
    return unet


def _has_unet_layout(unet: nn.Module) -> bool:
    return all(hasattr(unet, a) for a in ("down_blocks", "up_blocks", "mid_block", "conv_in"))


def skip_counts(unet: nn.Module) -> list[int]:
    """Skip outputs each down block adds to ``down_block_res_samples`` (resnets, then downsampler)."""
    return [len(block.resnets) + (1 if getattr(block, "downsamplers", None) else 0) for block in unet.down_blocks]


def num_skips(unet: nn.Module) -> int:
    """Length of ``down_block_res_samples``: the ``conv_in`` output plus every down block's outputs."""
    return 1 + sum(skip_counts(unet))


def is_spatio_temporal(unet: nn.Module) -> bool:
    """SVD's UNet names its branch with ``cache_branch`` rather than layer and block ids."""
    return type(unet).__name__ == "UNetSpatioTemporalConditionModel"


def skip_index_from_layer_block(unet: nn.Module, layer_id: int, block_id: int, prefix: str = "") -> int:
    """``k`` for OneDiffX's ``(cache_layer_id, cache_block_id)``; ``ConfigError`` with the valid range."""
    counts = skip_counts(unet)
    if not 0 <= layer_id < len(counts):
        raise ConfigError(
            f"{prefix}cache_layer_id={layer_id} is out of range for this UNet ({len(counts)} down blocks): "
            f"valid 0..{len(counts) - 1}"
        )
    if not 0 <= block_id < counts[layer_id]:
        raise ConfigError(
            f"{prefix}cache_block_id={block_id} is out of range for down block {layer_id} of this UNet "
            f"({counts[layer_id]} outputs): valid 0..{counts[layer_id] - 1}"
        )
    return 1 + sum(counts[:layer_id]) + block_id


def skip_index_from_branch(unet: nn.Module, branch: int, prefix: str = "") -> int:
    """``k`` for SVD's ``cache_branch`` (branch 0 is the first skip after ``conv_in``)."""
    last = num_skips(unet) - 2
    if not 0 <= branch <= last:
        raise ConfigError(f"{prefix}cache_branch={branch} is out of range for this UNet: valid 0..{last}")
    return branch + 1


def helper_branch_id(unet: nn.Module, layer_id: int, block_id: int) -> int:
    """``DeepCacheSDHelper``'s ``cache_branch_id`` for the same branch as OneDiffX's ids."""
    return skip_index_from_layer_block(unet, layer_id, block_id)


def replay_plan(unet: nn.Module, k: int) -> list[tuple[str, nn.Module]]:
    """The outermost modules whose outputs a shallow step replays, by qualified name.

    A module is replayed when everything it computes depends on skips deeper than ``k``; the modules
    in between run as usual. These are the same modules ``DeepCacheSDHelper`` skips, minus those
    nested in an already replayed parent, so images match the helper's exactly.
    """
    if not 0 <= k < num_skips(unet):
        raise ConfigError(f"deepcache: skip index {k} is out of range: valid 0..{num_skips(unet) - 1}")
    plan: list[tuple[str, nn.Module]] = []
    start = 1  # skip index of the first output of the current down block (0 is conv_in)
    for b, block in enumerate(unet.down_blocks):
        n_res = len(block.resnets)
        if start > k:
            plan.append((f"down_blocks.{b}", block))
        else:
            for layer in range(n_res):
                if start + layer > k:
                    plan += _layer(block, f"down_blocks.{b}", layer)
            for j, down in enumerate(getattr(block, "downsamplers", None) or ()):
                if start + n_res > k:
                    plan.append((f"down_blocks.{b}.downsamplers.{j}", down))
        start += n_res + (1 if getattr(block, "downsamplers", None) else 0)
    if unet.mid_block is not None:
        plan.append(("mid_block", unet.mid_block))
    end = num_skips(unet)  # up blocks consume skips from the deep end
    for i, block in enumerate(unet.up_blocks):
        n_res = len(block.resnets)
        consumed = [end - 1 - j for j in range(n_res)]  # skip index each resnet concatenates
        if min(consumed) > k:
            plan.append((f"up_blocks.{i}", block))
        else:
            for j, index in enumerate(consumed):
                if index > k:
                    plan += _layer(block, f"up_blocks.{i}", j)
        end -= n_res
    return plan


def _layer(block: nn.Module, name: str, j: int) -> list[tuple[str, nn.Module]]:
    """Resnet ``j`` of a block and the attention that follows it, if any."""
    out = [(f"{name}.resnets.{j}", block.resnets[j])]
    attentions: Optional[nn.ModuleList] = getattr(block, "attentions", None)
    if attentions is not None and j < len(attentions):
        out.append((f"{name}.attentions.{j}", attentions[j]))
    return out
