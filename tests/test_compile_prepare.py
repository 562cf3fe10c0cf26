"""What ``compile_pipe`` changes besides compiling: fused projections, 8-bit images on the device,
and the compiler imported beside the model load. Each is checked against diffusers' own result."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import torch

from conftest import REPO
from onediffx.fused_qkv import fuse_qkv
from onediffx.compile import postprocess as postprocess_module
from onediffx.compile.postprocess import pil_on_device
from onediffx.models.tiny import tiny_sdxl


def _unet_out(unet, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(1, 4, 8, 8, generator=g)
    text = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    added = {"text_embeds": torch.randn(1, 32, generator=g), "time_ids": torch.randn(1, 6, generator=g)}
    with torch.no_grad():
        return unet(sample, 10, encoder_hidden_states=text, added_cond_kwargs=added).sample


def test_loading_an_unfused_state_dict_reaches_the_fused_projections():
    fused_unet, plain_unet = tiny_sdxl().unet, tiny_sdxl().unet
    assert fuse_qkv(fused_unet) > 0
    torch.manual_seed(7)
    other = type(plain_unet).from_config(plain_unet.config).state_dict()  # a checkpoint: no to_qkv keys
    assert not any("to_qkv" in k or "to_kv" in k for k in other)
    before = _unet_out(fused_unet)
    fused_unet.load_state_dict(other)  # strict: the hook supplies the fused keys
    plain_unet.load_state_dict(other)
    after = _unet_out(fused_unet)
    assert (after - before).abs().max() > 1e-3
    torch.testing.assert_close(after, _unet_out(plain_unet), atol=1e-5, rtol=1e-5)
    # a state dict saved from the fused model round-trips unchanged
    fused_unet.load_state_dict(fused_unet.state_dict())
    torch.testing.assert_close(_unet_out(fused_unet), after, atol=0, rtol=0)


def _unique_bytes(module: torch.nn.Module) -> int:
    """Bytes of the distinct memory blocks behind the module's parameters (shared ones counted once)."""
    return sum({p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in module.parameters()}.values())


def test_fused_projections_cost_no_memory_and_compute_as_diffusers_fused_ones():
    ours, theirs, plain = tiny_sdxl().unet, tiny_sdxl().unet, tiny_sdxl().unet
    fuse_qkv(ours)
    theirs.fuse_qkv_projections()  # the oracle: diffusers keeps the separate projections beside the copy
    assert _unique_bytes(theirs) > _unique_bytes(plain)
    assert _unique_bytes(ours) == _unique_bytes(plain)  # the separate projections are the copy's rows
    torch.testing.assert_close(_unet_out(ours), _unet_out(theirs), atol=0, rtol=0)
    attention = ours.down_blocks[1].attentions[0].transformer_blocks[0].attn1
    with torch.no_grad():  # a write to one projection is a write to the copy, and to no other projection
        version = attention.to_q.weight._version
        attention.to_k.weight.mul_(2)
    assert attention.to_q.weight._version == version
    rows = attention.to_q.weight.shape[0]
    torch.testing.assert_close(attention.to_qkv.weight[rows:2 * rows], attention.to_k.weight, atol=0, rtol=0)


def test_pil_on_device_gives_diffusers_bytes(monkeypatch):
    processor = tiny_sdxl().image_processor
    handed = []  # Pillow copies a strided array element by element: ours must hand it contiguous pixels
    fromarray = postprocess_module.Image.fromarray
    monkeypatch.setattr(postprocess_module, "Image", SimpleNamespace(
        fromarray=lambda a: handed.append(a.flags.c_contiguous) or fromarray(a)))
    original = processor.postprocess
    # values on rounding boundaries (k + 0.5) / 255 and out of range, in the dtypes a VAE decodes in
    boundaries = ((torch.arange(256) + 0.5) / 255 * 2 - 1).repeat(3 * 16 * 16 // 256 + 1)[: 3 * 16 * 16]
    batches = [torch.rand(2, 3, 16, 16) * 2.4 - 1.2, boundaries.reshape(1, 3, 16, 16)]
    pil_on_device(processor)
    pil_on_device(processor)  # idempotent: one wrapper
    for batch in batches:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            image = batch.to(dtype)
            ours, theirs = processor.postprocess(image), original(image)
            assert len(ours) == len(theirs)
            for a, b in zip(ours, theirs):
                assert a.mode == b.mode == "RGB"
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert handed and all(handed)
    # outputs other than PIL, and unclamped images, are diffusers' own
    image = batches[0]
    np.testing.assert_array_equal(processor.postprocess(image, output_type="np"), original(image, output_type="np"))
    for a, b in zip(processor.postprocess(image, do_denormalize=[False, True]), original(image, do_denormalize=[False, True])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_compiler_preload_imports_inductor_in_a_thread():
    code = (
        "import sys, threading, torch\n"
        "from onediffx.compile.preload import CompilerPreload, MODULES\n"
        "assert 'torch._inductor.compile_fx' not in sys.modules\n"
        "p = CompilerPreload().start(); p.wait()\n"
        "assert p.error is None and all(m in sys.modules for m in MODULES)\n"
        "assert not [t for t in threading.enumerate() if t.name.startswith('onediffx')]\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_compiling_again_first_restores_the_eager_forwards():
    """``compile_pipe`` on a compiled pipeline (progressive start's switch) leaves nothing of the first compile."""
    from onediffx.compile import compile_options, compile_pipe, compile_state
    from onediffx.compile.pipe import restore_eager
    from onediffx.hooks import COMPILED, has_hook
    from onediffx.models.tiny import tiny_sd

    pipe = tiny_sd()
    compile_pipe(pipe, "inductor", compile_options("regional"))  # Dynamo's path: block.compile() on each block
    compiled_blocks = [m for m in pipe.unet.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    assert compiled_blocks
    compile_pipe(pipe, "inductor", compile_options("inductor"))  # nothing is called, so nothing compiles
    assert not any(getattr(m, "_compiled_call_impl", None) is not None for m in pipe.unet.modules())
    assert has_hook(pipe.unet, COMPILED)
    assert compile_state(pipe).options.regional is False
    assert restore_eager(pipe) >= 2 and "forward" not in pipe.unet.__dict__ and compile_state(pipe) is None


def test_attention_priority_resolves_per_device_and_enters_the_graph_key(monkeypatch):
    """``auto`` takes cuDNN's attention on Hopper only, and graphs traced under another priority
    are other graphs: the choice is part of the graph-cache key."""
    from onediffx.compile.attention import attention_priority, resolve_attention
    from onediffx.compile.config import CompileConfig
    from onediffx.compile.pipe import CompileState, component_key

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_attention("auto", cpu) == "default" and resolve_attention("flash", cpu) == "flash"
    for capability, expected in (((9, 0), "cudnn"), ((8, 0), "default")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert resolve_attention("auto", cuda) == expected
    with attention_priority("cudnn", cpu) as resolved:  # the CPU's kernels have no priority to set
        assert resolved == "cudnn"
    pipe = tiny_sdxl()
    keys = [component_key(pipe, "unet", CompileState("inductor", CompileConfig(backend="inductor", attention=a)))
            for a in ("auto", "flash")]
    assert keys[0]["compile"]["attention"] != keys[1]["compile"]["attention"]
    assert {k: v for k, v in keys[0].items() if k != "compile"} == {k: v for k, v in keys[1].items() if k != "compile"}


def test_attention_priority_keys_the_aot_autograd_cache_by_the_order(monkeypatch, tmp_path):
    """The Dynamo graph is the same under every priority; the salt keeps AOTAutograd's on-disk cache
    from handing one order's graph to another, and leaves it on (``save_pipe`` serializes from it)."""
    from torch._dynamo.utils import counters

    from onediffx.compile.attention import attention_priority

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    x = torch.randn(8, 8)
    seen = []
    for order in ("flash", "flash", "cudnn"):
        torch._dynamo.reset()
        counters.clear()
        with attention_priority(order, torch.device("cpu")):
            torch.compile(lambda t: torch.nn.functional.gelu(t @ t) + 1)(x)
        seen.append("hit" if counters["aot_autograd"]["autograd_cache_hit"] else "miss")
    assert seen == ["miss", "hit", "miss"]


def test_compile_pipe_pins_the_execution_device_until_the_pipeline_moves(monkeypatch):
    """diffusers looks for offloading hooks in every module at each call; a compiled pipeline asks once."""
    from onediffx.compile import compile_pipe
    from onediffx.compile.pipe import restore_eager

    pipe = tiny_sdxl()
    base, expected = type(pipe), pipe._execution_device
    modules = torch.nn.Module.modules

    def walked() -> bool:
        calls = []
        monkeypatch.setattr(torch.nn.Module, "modules", lambda self: calls.append(1) or modules(self))
        assert pipe._execution_device == expected
        monkeypatch.setattr(torch.nn.Module, "modules", modules)
        return bool(calls)

    assert walked()
    compile_pipe(pipe, "inductor")
    assert not walked()
    assert isinstance(pipe, base) and type(pipe).__name__ == base.__name__
    assert '"_class_name": "StableDiffusionXLPipeline"' in pipe.to_json_string()  # model_index.json diffusers loads
    pipe.to("cpu")  # moved: diffusers' lookup again, until the next compile
    assert walked()
    compile_pipe(pipe, "inductor")
    assert not walked()
    restore_eager(pipe)
    assert walked()
