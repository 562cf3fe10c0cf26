"""``compile_pipe``, ``save_pipe``, ``load_pipe``: OneDiffX's API over Inductor and the graph cache.

    pipe = compile_pipe(pipe)                 # compile UNet / VAE decoder / ControlNet in place
    pipe(prompt, ...)                         # the first call at each shape compiles
    save_pipe(pipe, dir="cached_pipe")        # persist what compilation produced
    ...                                       # in a new process:
    pipe = compile_pipe(pipe); load_pipe(pipe, dir="cached_pipe"); pipe(prompt, ...)   # no compiling
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any, Optional

import torch
from omegaconf import OmegaConf

from .config import CompileConfig
from ..graph_cache import GraphCache, config_digest, environment_key
from ..graph_cache import kernels as inductor_kernels
from ..hooks import AHEAD_OF_TIME, DEEP_CACHE_DISPATCH, has_hook, remove_hook
from ..registry import get_backend
from ..state import COMPILE, PASS_GRAPHS, REGIONS, cache_key_parts
from . import preload
from .backends import compile_kwargs, resolve_backend
from ..cuda_graphs import GraphedForward, graph_module, mark_passes
from .dispatch import CompiledForward
from .execution_device import pin_execution_device, unpin_execution_device
from ..fused_qkv import fuse_qkv
from .guard_scope import install as install_guard_fix
from .options import as_options, compile_options  # noqa: F401  (compile_options: re-exported)
from .postprocess import pil_on_device

log = logging.getLogger("onediffx.compile")

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
MEGA = "inductor-artifacts"


@dataclass
class CompileState:
    """What ``compile_pipe`` did to a pipeline, kept in its ``state.COMPILE`` slot."""

    backend: str
    options: CompileConfig
    saveable: dict[str, CompiledForward] = field(default_factory=dict)
    """Components compiled into saveable graphs, by attribute path."""
    dynamo: list[str] = field(default_factory=list)
    """Components compiled by Dynamo's usual path (saved as Inductor cache artifacts)."""
    graphed: dict[str, GraphedForward] = field(default_factory=dict)
    """Components whose forward replays CUDA graphs (``cuda_graphs``), by attribute path."""


def _find(pipe: Any, path: str) -> Optional[torch.nn.Module]:
    obj = pipe
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj if isinstance(obj, torch.nn.Module) else None


def _device_of(pipe: Any) -> torch.device:
    return getattr(pipe, "device", None) or torch.device("cpu")


def _cast_inputs_hook(module: torch.nn.Module, args: tuple, kwargs: dict):
    dtype = next(module.parameters()).dtype
    return tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args), kwargs


def _prepare(pipe: Any, options: CompileConfig, device: torch.device) -> None:
    """Layout and precision changes that make compiled kernels faster, applied before compiling."""
    vae = getattr(pipe, "vae", None)
    cast = options.vae_dtype and vae is not None and device.type == "cuda"
    if cast and vae.dtype not in (torch.float32, getattr(torch, options.vae_dtype)):
        # bf16 has fp32's exponent range, so the SDXL VAE needs no fp32 upcast to avoid overflow.
        # nn.Module.to: diffusers' override warns on every cast about fp32-pinned modules the VAE does not have
        torch.nn.Module.to(vae, getattr(torch, options.vae_dtype))
        vae.register_to_config(force_upcast=False)
        vae.post_quant_conv.register_forward_pre_hook(_cast_inputs_hook, with_kwargs=True)
        vae.decoder.register_forward_pre_hook(_cast_inputs_hook, with_kwargs=True)
    for path in ("unet", "transformer", "controlnet", "vae"):
        module = _find(pipe, path)
        if module is None:
            continue
        if options.channels_last:
            to_channels_last(module)
        if options.fuse_qkv and hasattr(module, "fuse_qkv_projections"):
            fuse_qkv(module)


def to_channels_last(module: torch.nn.Module) -> None:
    """Channels-last for every 4-D weight, in place (``Parameter`` objects kept, so graphs and LoRA see them).

    ``module.to(memory_format=channels_last)`` refuses a module holding any 5-D weight, and SVD's
    UNet and VAE hold temporal ``Conv3d`` layers beside their 2-D ones: those modules get their 4-D
    weights converted one by one and the 5-D ones left as they are. Every other module keeps
    ``Module.to``, whose layouts the saved regional graphs were compiled for (converting weight by
    weight there made regions of one structure compile a second graph).
    """
    if all(p.dim() != 5 for p in module.parameters()):
        module.to(memory_format=torch.channels_last)
        return
    with torch.no_grad():
        for param in module.parameters():
            if param.dim() == 4:
                param.data = param.data.contiguous(memory_format=torch.channels_last)


def compile_pipe(pipe: Any, backend: str = "inductor", options: Any = None, *, on_miss: str = "compile") -> Any:
    """Compile the pipeline's heavy components in place and return the pipeline.

    ``options`` is a ``CompileConfig`` (``compile_options("inductor", ...)``), OneDiffX's
    ``compile_options`` object with attributes assigned, a dict of ``CompileConfig`` fields, or
    ``None`` for the backend's preset (``inductor``). Compilation happens at the first call for
    each input shape; ``on_miss="eager"`` makes shapes beyond those already compiled (or loaded)
    run eagerly.
    """
    preload.wait()  # never import the compiler's modules in two threads at once
    device = _device_of(pipe)
    backend = resolve_backend(backend, device)
    options = as_options(options, backend, stacklevel=3)  # a warning about ignored options points at the caller
    if compile_state(pipe) is not None:  # compiled before: back to eager forwards, then compile anew
        restore_eager(pipe)
    state = COMPILE.set(pipe, CompileState(backend=backend, options=options))
    if backend == "none":
        return pipe
    install_guard_fix()  # Dynamo's lazy path builds guards too
    _prepare(pipe, options, device)
    pin_execution_device(pipe)
    if options.pil_on_device and getattr(pipe, "image_processor", None) is not None:
        pil_on_device(pipe.image_processor)
    compile_fn = get_backend(backend)
    paths = list(options.components) + (list(TEXT_ENCODERS) if options.text_encoders else [])
    if options.regional and options.regions:
        _check_regions(pipe, paths, options.regions)
    for path in paths:
        module = _find(pipe, path)
        if module is None:
            continue
        # DeepCache's replay hooks are already on the UNet's blocks: only Dynamo's path traces them.
        # (A DeepCache pipeline not yet called has no hooks yet: its first call releases the UNet's
        # whole-component graphs, and region graphs stay, under the replay hooks.)
        opts = replace(options, graph="dynamo") if has_hook(module, DEEP_CACHE_DISPATCH) else options
        handle = compile_fn(module, path, opts, on_miss)
        if isinstance(handle, dict):  # ahead-of-time regions: one entry per block structure
            state.saveable.update({f"{path}.{block}": compiled for block, compiled in handle.items()})
        elif isinstance(handle, CompiledForward):
            state.saveable[path] = handle
            handle.on_release = lambda h, path=path: _released(state, path)
        else:
            state.dynamo.append(path)
        if options.cuda_graphs and device.type == "cuda" and backend == "inductor":
            _add_cuda_graphs(state, module, path, opts, handle)
    if options.cuda_graphs and device.type == "cuda" and not options.text_encoders:
        # Uncompiled text encoders are nothing but kernel launches at 77 tokens: graph them eager.
        for path in TEXT_ENCODERS:
            module = _find(pipe, path)
            if module is not None:
                state.graphed[path] = graph_module(module, path)
    return pipe


def pipeline_modules(pipe: Any) -> list[torch.nn.Module]:
    """The pipeline's torch components (UNet, VAE, text encoders, ...), whatever the pipeline class."""
    return [value for value in vars(pipe).values() if isinstance(value, torch.nn.Module)]


def restore_eager(pipe: Any) -> int:
    """Remove compile's named hooks (compiled, regional, CUDA-graphed) and Dynamo's
    ``module.compile`` from every module of the pipeline; return how many were removed.

    Weights and layout changes (channels-last, fused projections, the VAE's dtype) stay: they are
    what the next ``compile_pipe`` would make anyway. Hooks installed by others (DeepCache's) stay
    too, in their order. Dropping the CUDA-graph hooks frees their memory pools.
    """
    removed = 0
    for component in pipeline_modules(pipe):
        for module in component.modules():
            removed += sum(remove_hook(module, name) for name in AHEAD_OF_TIME)  # outermost first
            if getattr(module, "_compiled_call_impl", None) is not None:  # ``module.compile()`` (Dynamo's path)
                module._compiled_call_impl = None
                removed += 1
            REGIONS.clear(module)
            PASS_GRAPHS.clear(module)
    COMPILE.clear(pipe)
    unpin_execution_device(pipe)
    return removed


def _check_regions(pipe: Any, paths: list[str], names: list[str]) -> None:
    """A region name that matches no block would silently compile the whole component instead."""
    from ..errors import ConfigError

    from .regions import REPEATED

    found = {path: module for path in paths if (module := _find(pipe, path)) is not None}
    # Any component counts: the regional preset's ResnetBlock2D is the VAE's even when only a transformer compiles.
    present = {type(m).__name__ for module in pipeline_modules(pipe) for m in module.modules()}
    missing = [name for name in names if name not in present and name != REPEATED]
    if missing:
        blocks = sorted(n for n in present if n.endswith(("Block", "Block2D", "Block3D")))
        raise ConfigError(f"compile.regions: no {', '.join(missing)} in {', '.join(found)}; "
                          f"block classes there: {', '.join(blocks) or 'none'}")


def _add_cuda_graphs(state: CompileState, module: torch.nn.Module, path: str, options: CompileConfig,
                     handle: Optional[CompiledForward]) -> None:
    """CUDA graphs over a component's forward, where its forward is ours to wrap.

    Ahead-of-time and regional forwards are plain Python over compiled code, so a graph can
    capture them whole. A module compiled by ``module.compile()`` is entered through Dynamo,
    which a graph wrapper would bypass; there only DeepCache's passes (compiled explicitly) are
    captured, and Inductor's own ``mode=reduce-overhead`` remains for the rest. Under DeepCache's
    dispatcher (asked of the registry) only the passes are captured, never the step dispatch.
    """
    regional = REGIONS.get(module)
    mark_passes(module, None if regional else compile_kwargs(options))  # regions are compiled already
    if (handle is not None or regional) and not has_hook(module, DEEP_CACHE_DISPATCH):
        graphed = state.graphed[path] = graph_module(module, path)
        graphed.on_release = lambda: state.graphed.pop(path, None)


def _released(state: CompileState, path: str) -> None:
    state.saveable.pop(path, None)
    state.dynamo.append(path)


def compile_state(pipe: Any) -> Optional[CompileState]:
    """What ``compile_pipe`` did to ``pipe`` (``None``: not compiled, or restored to eager)."""
    return COMPILE.get(pipe)


def compile_counters(pipe: Any) -> dict[str, Any]:
    """Graphs compiled in this process, graphs loaded from the cache, Dynamo's traced graphs, and
    the seconds each saveable component spent compiling (what a cold start pays, per component)."""
    from torch._dynamo.utils import counters

    state = compile_state(pipe)
    handles = list(state.saveable.values()) if state else []
    compiled = sum(h.compiles for h in handles)
    return {
        "graphs_compiled": compiled,
        "graphs_loaded": sum(len(h.entries) for h in handles) - compiled,
        "dynamo_graphs": int(counters["stats"]["unique_graphs"]),
        "compile_seconds": {path: h.compile_seconds for path, h in (state.saveable.items() if state else ())
                            if h.compile_seconds},
    }


def component_key(pipe: Any, path: str, state: CompileState) -> dict[str, Any]:
    """The graph cache's key of one component: environment, architecture, dtype, compile options,
    and each state slot's part (quantized weights: graphs over them are other graphs)."""
    module = _find(pipe, path)
    param = next(module.parameters())
    return {
        **cache_key_parts(pipe, path),
        **environment_key(param.device),
        "component": path,
        "class": type(module).__name__,
        "architecture": getattr(state.saveable.get(path), "digest", None) or config_digest(module),
        "dtype": str(param.dtype).replace("torch.", ""),
        "compile": {k: v for k, v in OmegaConf.to_container(OmegaConf.structured(state.options)).items()
                    if k not in ("components", "text_encoders", "pil_on_device", "progressive")},
    }


def _dynamo_key(pipe: Any, state: CompileState) -> dict[str, Any]:
    return {**component_key(pipe, state.dynamo[0], state), "components": sorted(state.dynamo)}


def _kernels_in_use() -> list[tuple[str, bytes]]:
    """Inductor's C++ kernels this process uses, bundled with what it saves."""
    out = []
    for target, file in inductor_kernels.in_use().items():
        try:
            out.append((target, file.read_bytes()))
        except OSError:
            continue
    return out


def save_pipe(pipe: Any, dir: str = "cached_pipe", *, overwrite: bool = True, trusted: bool = False,
              key_file: Optional[str] = None) -> dict[str, Any]:
    """Persist the compiled graphs of ``pipe`` into ``dir``; returns what was written per component.

    ``trusted``/``key_file``: see ``GraphCache``. A cache that cannot be written is one warning
    and nothing written, never an error.
    """
    state = compile_state(pipe)
    if state is None or state.backend == "none":
        raise ValueError("save_pipe: the pipeline is not compiled; call compile_pipe(pipe) and run it once first")
    cache, written = GraphCache(dir, trusted=trusted, key_file=key_file), {}
    kernels = None
    for path, compiled in state.saveable.items():
        if not compiled.entries or (not overwrite and not compiled.dirty):
            continue
        try:
            blobs = compiled.serialize()
        except Exception as err:  # noqa: BLE001 - a graph PyTorch cannot serialize costs a restart's compile, not the run
            log.warning("graph cache: %s could not be serialized (%s: %s); nothing saved for it, the next start "
                        "compiles it", path, type(err).__name__, err)
            continue
        kernels = _kernels_in_use() if kernels is None else kernels
        entry = cache.save(path, component_key(pipe, path, state), blobs, compiled.signatures, kernels)
        if entry is None:
            continue
        compiled.dirty = False
        written[path] = {"path": str(entry), "graphs": len(compiled.entries), "kernels": len(kernels)}
    if state.dynamo:
        blob = torch.compiler.save_cache_artifacts()
        if blob is not None:
            kernels = _kernels_in_use() if kernels is None else kernels
            entry = cache.save(MEGA, _dynamo_key(pipe, state), [blob[0]], [state.dynamo], kernels)
            if entry is not None:
                written[MEGA] = {"path": str(entry), "graphs": len(state.dynamo), "kernels": len(kernels)}
    return written


def load_pipe(pipe: Any, dir: str = "cached_pipe", *, trusted: bool = False,
              key_file: Optional[str] = None) -> dict[str, Any]:
    """Load graphs saved by ``save_pipe`` into a pipeline already passed to ``compile_pipe``.

    Returns ``{component: {"hit": bool, ...}}``. A missing, stale, corrupt, unsigned or untrusted
    entry is a miss: that component compiles at its first call, as if nothing had been saved.
    Graphs that loaded but needed Inductor's C++ kernels rebuilt (an emptied
    ``TORCHINDUCTOR_CACHE_DIR`` and an entry without them) are ``"reason": "kernels rebuilt"``,
    not a hit, and are marked to be saved again with their kernels.
    """
    state = compile_state(pipe)
    if state is None or state.backend == "none":
        raise ValueError("load_pipe: call compile_pipe(pipe) first, with the options the graphs were saved with")
    preload.wait()
    cache, found = GraphCache(dir, trusted=trusted, key_file=key_file), {}
    for path, compiled in state.saveable.items():
        start = time.perf_counter()
        loaded = cache.load(path, component_key(pipe, path, state))
        read_s = time.perf_counter() - start
        if loaded is None:
            found[path] = {"hit": False, "reason": cache.last_miss}
            continue
        restored = inductor_kernels.restore(loaded.kernels)
        before = inductor_kernels.present()
        try:
            compiled.load(loaded.blobs, loaded.signatures)
        except Exception as err:  # an artifact this torch cannot read is stale, not fatal
            cache.discard(loaded.path, f"{type(err).__name__}: {err}".splitlines()[0])
            found[path] = {"hit": False, "reason": cache.last_miss}
            continue
        new = inductor_kernels.present() - before
        ours = inductor_kernels.mapped()  # the folder is shared: count only what this process built and loaded
        built = len(new if ours is None else new & ours.keys())
        # Where a restart's seconds go: reading and verifying the files, or deserializing the graphs.
        seconds = {"read_s": round(read_s, 3), "load_s": round(time.perf_counter() - start - read_s, 3)}
        found[path] = {"hit": not built, "graphs": len(loaded.blobs), "signatures": loaded.signatures,
                       "kernels_restored": restored, "kernels_built": built, **seconds}
        log.info("graph cache: %s: %d graphs read in %.2f s, loaded in %.2f s", path, len(loaded.blobs),
                 seconds["read_s"], seconds["load_s"])
        if built:
            log.warning("graph cache: %s loaded, but Inductor's cache folder lacked its %d C++ kernels and they "
                        "were rebuilt; saving the entry again with them", path, built)
            found[path]["reason"] = "kernels rebuilt"
            compiled.dirty = True
    if state.dynamo:
        loaded = cache.load(MEGA, _dynamo_key(pipe, state))
        if loaded is not None:
            inductor_kernels.restore(loaded.kernels)
            torch.compiler.load_cache_artifacts(loaded.blobs[0])
        found[MEGA] = {"hit": loaded is not None} if loaded is not None else {"hit": False, "reason": cache.last_miss}
    return found
