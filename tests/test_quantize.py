"""Quantization (``onediffx.quantize``): torchao's int8 on the tiny models (CPU), fp8 on a GPU.

Oracles: the unquantized pipeline with the same seed (PSNR, SSIM, relative error); diffusers'
own LoRA fusing on the unquantized model followed by the same quantization; the quantized weights
saved before fusing (unfusing must restore them bit for bit); graphs loaded from the cache against
freshly compiled ones. Inductor compiles once in this module (the cache test, marked slow).
"""

from __future__ import annotations

import csv
import json
import random
import sys

import numpy as np
import pytest
import torch

import onediffx.lora as lora
from onediffx.fused_qkv import joined, projections
from conftest import job_dirs, run_cli
from onediffx.lora.synthetic import lora_targets, random_lora, save_kohya
from onediffx.models.tiny import tiny_sd, tiny_sdxl
from onediffx.quantize import QuantizeConfig, quantize_pipe, quantize_state
from onediffx.quantize.quality import image_fidelity
from onediffx.quantized_weights import inner_tensors, is_quantized, record_of

pytest.importorskip("torchao")

MIN_PSNR_DB = 35.0
"""int8 on the tiny models' random weights: about 53 dB at 4 steps (seed 0). Random weights are not
real ones: this says nothing broke, not how a real checkpoint fares."""


def _image(pipe, steps: int = 2) -> np.ndarray:
    gen = torch.Generator().manual_seed(0)
    return pipe("a cat", num_inference_steps=steps, height=64, width=64, generator=gen, output_type="np").images[0]


def _quantized(pipe) -> dict[str, list[torch.Tensor]]:
    """Every quantized weight's inner tensors, copied."""
    return {name: [t.clone() for t in inner_tensors(p)] for name, p in pipe.unet.named_parameters() if is_quantized(p)}


def _fused_attentions(unet) -> list:
    return [m for m in unet.modules() if getattr(m, "fused_projections", False)]


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(all(torch.equal(x, y) for x, y in zip(a[k], b[k])) for k in a)


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --- the stage and the CLI -------------------------------------------------------------------------


def test_int8_run_is_close_to_unquantized_and_lists_its_layers(tmp_path):
    """One sweep, two jobs: quantize=off is the baseline the sweep summary compares int8 with."""
    proc = run_cli("run", "-m", "quantize=off,int8", "steps=4", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    jobs = {json.loads((d / "metrics.json").read_text())["stages"]["quantize"].get("mode", "off"): d
            for d in job_dirs(tmp_path / "outputs")}
    assert set(jobs) == {"off", "int8"}
    metrics = json.loads((jobs["int8"] / "metrics.json").read_text())
    stage = metrics["stages"]["quantize"]
    assert stage["mode"] == "int8" and stage["layers"] == len(stage["quantized_layers"]) > 40
    assert all(name.startswith("unet.") for name in stage["quantized_layers"])
    assert not any("time_embedding" in name for name in stage["quantized_layers"])  # excluded by default
    assert stage["weight_mib_after"] < stage["weight_mib_before"]
    assert json.loads((jobs["off"] / "metrics.json").read_text())["stages"]["quantize"]["enabled"] is False
    # the sweep's own fidelity column (PSNR against the quantize=off job's image, same seed)
    rows = list(csv.DictReader(open(next((tmp_path / "outputs").rglob("summary.csv")))))
    psnr = [float(r["psnr_db"]) for r in rows if "int8" in json.dumps(r)]
    assert len(psnr) == 1 and MIN_PSNR_DB <= psnr[0] < float("inf")
    # the stage measured the same thing itself, and one UNet output's relative error
    quality = stage["quality"]
    assert quality["psnr_db"] == pytest.approx(psnr[0], abs=0.05)
    assert 0 < quality["unet_rel_error"] < 0.02 and quality["ssim"] > 0.99


def test_fp8_on_a_cpu_fails_at_start_in_one_line(tmp_path):
    proc = run_cli("run", "quantize=fp8", "device=cpu", cwd=tmp_path)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr
    assert "quantize=fp8" in lines[0] and "compute capability >= 8.9" in lines[0] and "quantize=int8" in lines[0]
    assert not (tmp_path / "outputs").exists() or not job_dirs(tmp_path / "outputs")


def test_bad_options_are_one_line(compose_run):

    from onediffx.errors import ConfigError
    from onediffx.resolver import plan

    with pytest.raises(ConfigError, match="quantize.components: 'text_encoder'"):
        plan(compose_run("quantize=int8", "quantize.components=[text_encoder]"))
    with pytest.raises(ConfigError, match="quantize.min_features=0"):
        plan(compose_run("quantize=int8", "quantize.min_features=0"))
    with pytest.raises(Exception, match="mode"):
        compose_run("quantize.mode=int4")


# --- the library: layer choice, dtype, exclusions -------------------------------------------------


def test_exclude_patterns_min_features_and_pointwise_convolutions():
    pipe = _quiet(tiny_sd())
    reference = _image(pipe)
    n_conv = sum(type(m) is torch.nn.Conv2d and m.kernel_size == (1, 1) for m in pipe.unet.modules())
    quantize_pipe(pipe, "int8", exclude=["unet.up_blocks.*"], conv_1x1=True, min_features=8)
    state = quantize_state(pipe)
    assert not any(n.startswith("unet.up_blocks.") for n in state.layers)
    assert any(why.startswith("excluded (unet.up_blocks.*)") for why in state.skipped.values())
    assert "unet.conv_in" not in state.layers and "unet.conv_out" not in state.layers
    pointwise = [n for n, m in pipe.unet.named_modules() if type(m).__name__ == "PointwiseConv"]
    assert n_conv > 0 and len(pointwise) > 0 and set(pointwise) <= {n.removeprefix("unet.") for n in state.layers}
    psnr, _ = image_fidelity((reference * 255).round().astype(np.uint8), (_image(pipe) * 255).round().astype(np.uint8))
    assert psnr > MIN_PSNR_DB
    with pytest.raises(Exception, match="quantized already"):
        quantize_pipe(pipe, "int8")


def test_fp8_is_refused_on_the_cpu_and_int8_weight_only_halves_weights():
    from onediffx.errors import NotAvailableError

    pipe = _quiet(tiny_sd())
    with pytest.raises(NotAvailableError, match="use quantize=int8"):
        quantize_pipe(pipe, "fp8")
    assert quantize_state(pipe) is None and not _quantized(pipe)  # refused before anything changed
    quantize_pipe(pipe, options=QuantizeConfig(mode="int8_weight_only"))
    facts = quantize_state(pipe).facts()
    assert facts["mode"] == "int8_weight_only" and facts["layers"] > 40
    assert np.isfinite(_image(pipe)).all()


# --- LoRA on quantized weights ----------------------------------------------------------------------


def _write_loras(pipe, tmp_path, n: int) -> list:
    targets = lora_targets(pipe, components=("unet",))
    return [save_kohya(random_lora(targets, 2 + i, seed=20 + i, strength=0.5), tmp_path / f"l{i}.safetensors")
            for i in range(n)]


@pytest.mark.parametrize("fused_qkv", [False, True], ids=["plain", "fused_qkv"])
def test_lora_on_a_quantized_unet_matches_diffusers_then_quantization(fused_qkv, tmp_path):
    (source,) = _write_loras(tiny_sd(), tmp_path, 1)
    ours = quantize_pipe(_quiet(tiny_sd()), "int8", fuse_qkv=fused_qkv)
    before, base_image = _quantized(ours), _image(ours)
    if fused_qkv:  # the separate projections LoRA fuses into are the kept original's rows, not a second copy
        shared = [joined(parts).data_ptr() == record_of(fused.weight).original.data_ptr()
                  for fused, parts in map(projections, _fused_attentions(ours.unet)) if is_quantized(fused.weight)]
        assert shared and all(shared)

    oracle = _quiet(tiny_sd())  # diffusers fuses into the float32 weights; then the same quantization
    oracle.load_lora_weights(str(source.parent), weight_name=source.name)
    oracle.fuse_lora(lora_scale=0.8)
    oracle.unload_lora_weights()
    quantize_pipe(oracle, "int8", fuse_qkv=fused_qkv)

    lora.load_and_fuse_lora(ours, str(source), lora_scale=0.8)
    got, expected = _quantized(ours), _quantized(oracle)
    assert got.keys() == expected.keys()
    changed = [k for k in got if not all(torch.equal(a, b) for a, b in zip(got[k], before[k]))]
    assert len(changed) >= 20, "the LoRA should reach the quantized layers"
    off_by_one = 0
    for key in got:  # int8 values at most one step apart (rounding of a float32 sum), scales equal to float eps
        diff = (got[key][0].int() - expected[key][0].int()).abs()
        assert diff.max() <= 1, key
        off_by_one += int(diff.sum())
        torch.testing.assert_close(got[key][1], expected[key][1], rtol=1e-5, atol=0)
    assert off_by_one <= 1e-3 * sum(v[0].numel() for v in got.values())
    image = _image(ours)  # a step's difference here and there, amplified by two denoising steps
    np.testing.assert_allclose(image, _image(oracle), atol=2e-2)
    assert np.abs(image - base_image).max() > 1e-2, "the LoRA should change the image"

    lora.unfuse_lora(ours)
    assert _same(_quantized(ours), before), "unfuse must restore the quantized weights bit for bit"
    np.testing.assert_array_equal(_image(ours), base_image)


def test_twenty_switches_leave_no_drift(tmp_path):
    pipe = quantize_pipe(_quiet(tiny_sd()), "int8")
    before = _quantized(pipe)
    sources = _write_loras(tiny_sd(), tmp_path, 3)
    names = ["a", "b", "c"]
    for name, source in zip(names, sources):
        lora.load_lora_and_optionally_fuse(pipe, str(source), name, fuse=False, offload_device="cpu")
    rng = random.Random(0)
    for _ in range(20):
        chosen = rng.sample(names, rng.randint(0, len(names)))
        lora.set_and_fuse_adapters(pipe, chosen, [rng.uniform(-1.2, 1.2) for _ in chosen])
    lora.set_and_fuse_adapters(pipe, ["c", "a"], [0.6, -0.4])
    fresh = quantize_pipe(_quiet(tiny_sd()), "int8")
    for name, source in zip(names, sources):
        lora.load_lora_and_optionally_fuse(fresh, str(source), name, fuse=False)
    lora.set_and_fuse_adapters(fresh, ["a", "c"], [-0.4, 0.6])
    assert _same(_quantized(pipe), _quantized(fresh)), "switching drifted"
    assert not _same(_quantized(pipe), before)
    lora.unfuse_lora(pipe)
    assert _same(_quantized(pipe), before)


def test_a_lora_is_refused_whole_when_originals_were_not_kept(tmp_path):
    from onediffx.lora import LoraError

    pipe = quantize_pipe(_quiet(tiny_sd()), "int8", keep_originals="none")
    (source,) = _write_loras(tiny_sd(), tmp_path, 1)
    before = _quantized(pipe)
    with pytest.raises(LoraError, match="keep_originals"):
        lora.load_and_fuse_lora(pipe, str(source))
    assert _same(_quantized(pipe), before)


def test_quantizing_refuses_a_pipeline_with_loras_loaded(tmp_path):
    """A loaded adapter points at the weights quantizing replaces: fusing it later would write weights
    nothing reads. Refused in one line, nothing quantized; after ``delete_adapters`` it goes ahead."""
    from onediffx.errors import ConfigError

    pipe = _quiet(tiny_sd())
    (source,) = _write_loras(tiny_sd(), tmp_path, 1)
    lora.load_lora_and_optionally_fuse(pipe, str(source), "a", fuse=False)
    with pytest.raises(ConfigError, match="LoRAs are loaded into this pipeline; quantize first"):
        quantize_pipe(pipe, "int8")
    assert quantize_state(pipe) is None and not _quantized(pipe)
    lora.delete_adapters(pipe)
    quantize_pipe(pipe, "int8")
    before = _quantized(pipe)
    lora.load_and_fuse_lora(pipe, str(source))
    assert before and not _same(_quantized(pipe), before), "the LoRA loaded after quantizing reaches the weights"


def test_deepcache_runs_both_passes_quantized(compose_run):
    """The shallow pass (DeepCache's cached steps) reads quantized layers too."""
    from onediffx.generate import Settings, generate
    from onediffx.resolver import assemble

    asm = assemble(compose_run("quantize=int8", "quantize.quality=false", "deepcache=i2", "steps=4"))
    unet = asm.pipe.unet
    shallow = next(m for n, m in unet.named_modules() if n.startswith("down_blocks.0.") and is_quantized(getattr(m, "weight", None)))
    deep = next(m for n, m in unet.named_modules() if n.startswith("mid_block.") and is_quantized(getattr(m, "weight", None)))
    calls = {"shallow": 0, "deep": 0}
    hooks = [shallow.register_forward_hook(lambda *_: calls.__setitem__("shallow", calls["shallow"] + 1)),
             deep.register_forward_hook(lambda *_: calls.__setitem__("deep", calls["deep"] + 1))]
    image = generate(asm, Settings.from_config(asm.cfg)).images[0]
    for h in hooks:
        h.remove()
    assert calls["shallow"] == 4 and calls["deep"] == 2  # every step's shallow pass, every other step's deep one
    plain = assemble(compose_run("deepcache=i2", "steps=4"))
    psnr, _ = image_fidelity(generate(plain, Settings.from_config(plain.cfg)).images[0], image)
    assert MIN_PSNR_DB <= psnr < float("inf")


# --- the graph cache --------------------------------------------------------------------------------


def test_cache_key_includes_quantization():
    from onediffx.compile import compile_options, compile_pipe, compile_state
    from onediffx.compile.pipe import component_key

    keys = {}
    for mode in ("off", "int8", "int8_weight_only"):
        pipe = tiny_sd()
        quantize_pipe(pipe, mode)
        compile_pipe(pipe, "inductor", compile_options("inductor", components=["unet"]))  # lazy: nothing compiles
        keys[mode] = component_key(pipe, "unet", compile_state(pipe))
    assert "quantize" not in keys["off"] and keys["int8"]["quantize"]["mode"] == "int8"
    assert keys["int8"]["quantize"]["count"] > 40 and keys["int8"]["quantize"]["torchao"]
    assert keys["int8"]["quantize"]["recipe"] != keys["int8_weight_only"]["quantize"]["recipe"]  # the torchao config
    assert keys["int8_weight_only"]["quantize"]["mode"] == "int8_weight_only"
    from onediffx.graph_cache import key_hash

    assert len({key_hash(k) for k in keys.values()}) == 3  # a cache made without quantization is a miss with it


@pytest.mark.slow
def test_quantized_graphs_restart_from_the_cache_and_take_loras(tmp_path):
    """Process 1 compiles the int8 UNet and saves it; process 2 (the CLI again) compiles nothing and
    gives the same image; this process loads the same graphs and fuses a LoRA that they read."""
    from PIL import Image

    from onediffx.compile import compile_options, compile_pipe, compile_state, load_pipe
    from onediffx.compile.pipe import compile_counters

    args = ["run", "quantize=int8", "quantize.quality=false", "compile=inductor", "compile.components=[unet]",
            f"cache.dir={tmp_path / 'graphs'}", "steps=2"]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = run_cli(*args, cwd=tmp_path / "a")
    assert first.returncode == 0, first.stderr[-2000:]
    second = run_cli(*args, cwd=tmp_path / "b")
    assert second.returncode == 0, second.stderr[-2000:]
    (job_a,), (job_b,) = job_dirs(tmp_path / "a" / "outputs"), job_dirs(tmp_path / "b" / "outputs")
    m_a, m_b = (json.loads((j / "metrics.json").read_text()) for j in (job_a, job_b))
    assert m_a["stages"]["save-graph"]["saved"] is True and m_a["compile_counters"]["graphs_compiled"] >= 1
    assert m_b["stages"]["load-graph"]["hit"] is True
    assert m_b["compile_counters"]["graphs_compiled"] == 0 and m_b["compile_counters"]["dynamo_graphs"] == 0
    images = [np.asarray(Image.open(j / m["outputs"][0]), dtype=np.int16) for j, m in ((job_a, m_a), (job_b, m_b))]
    assert np.abs(images[0] - images[1]).max() <= 1

    # here: the same pipeline as the CLI's
    pipe = quantize_pipe(_quiet(tiny_sd()), "int8")
    eager_pipe = quantize_pipe(_quiet(tiny_sd()), "int8")
    compile_pipe(pipe, "inductor", compile_options("inductor", components=["unet"]))
    assert load_pipe(pipe, str(tmp_path / "graphs"))["unet"]["hit"] is True
    gen = lambda p: p("a photo of an astronaut riding a horse on the moon", num_inference_steps=2, height=64, width=64,
                      generator=torch.Generator().manual_seed(0), output_type="np").images[0]  # noqa: E731
    base = gen(pipe)
    (source,) = _write_loras(tiny_sd(), tmp_path, 1)
    for p in (pipe, eager_pipe):
        lora.load_and_fuse_lora(p, str(source), lora_scale=1.0)
    fused = gen(pipe)
    assert compile_state(pipe).saveable["unet"].compiles == 0 and compile_counters(pipe)["graphs_compiled"] == 0
    assert np.abs(fused - base).max() > 1e-2, "the compiled graph must read the re-quantized weights"
    # Inductor's fused dynamic quantization rounds some activations the other way than eager does:
    # the compiled image with the LoRA must be far closer to eager's with it than to its own without.
    u8 = lambda a: (a * 255).round().astype(np.uint8)  # noqa: E731
    to_eager, _ = image_fidelity(u8(gen(eager_pipe)), u8(fused))
    to_base, _ = image_fidelity(u8(base), u8(fused))
    assert to_eager >= 40 and to_base <= to_eager - 10, (to_eager, to_base)
    lora.unfuse_lora(pipe)
    np.testing.assert_array_equal(gen(pipe), base)


# --- GPU: fp8 on the tiny SDXL model ------------------------------------------------------------------


@pytest.mark.gpu
def test_fp8_tiny_sdxl_compiles_restarts_from_the_cache_and_fuses_a_lora(tmp_path):
    import subprocess
    import textwrap

    from conftest import REPO

    script = textwrap.dedent("""
        import json, sys, torch
        from onediffx.compile import compile_options, compile_pipe, load_pipe, save_pipe
        from onediffx.compile.pipe import compile_counters
        from onediffx.models.tiny import tiny_sdxl
        from onediffx.quantize import quantize_pipe, quantize_state
        import onediffx.lora as lora
        cache, mode, lora_file = sys.argv[1], sys.argv[2], sys.argv[3]
        pipe = tiny_sdxl().to("cuda", torch.float16)
        pipe.set_progress_bar_config(disable=True)
        quantize_pipe(pipe, "fp8")
        compile_pipe(pipe, "inductor", compile_options("inductor", components=["unet"]))
        found = load_pipe(pipe, cache) if mode == "load" else {}
        gen = lambda: pipe("a cat", num_inference_steps=2, height=64, width=64,
                           generator=torch.Generator().manual_seed(0), output_type="np").images[0]
        base = gen()
        if mode == "save":
            save_pipe(pipe, cache)
        lora.load_and_fuse_lora(pipe, lora_file, lora_scale=1.0)
        fused = gen()
        lora.unfuse_lora(pipe)
        again = gen()
        print(json.dumps({"hit": found.get("unet", {}).get("hit"), "counters": compile_counters(pipe),
                          "dtype": quantize_state(pipe).dtype, "layers": len(quantize_state(pipe).layers),
                          "lora_change": float(abs(fused - base).max()), "unfuse_diff": float(abs(again - base).max()),
                          "base": base.tolist()}))
    """)
    (source,) = _write_loras(tiny_sdxl(), tmp_path, 1)
    outs = {}
    for mode in ("save", "load"):
        proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "graphs"), mode, str(source)], cwd=REPO,
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    saved, loaded = outs["save"], outs["load"]
    assert saved["dtype"] == "bfloat16" and saved["layers"] > 20 and saved["counters"]["graphs_compiled"] >= 1
    assert loaded["hit"] is True and loaded["counters"]["graphs_compiled"] == 0 and loaded["counters"]["dynamo_graphs"] == 0
    assert np.abs(np.array(saved["base"]) - np.array(loaded["base"])).max() <= 1e-3
    for out in (saved, loaded):
        assert out["lora_change"] > 1e-2 and out["unfuse_diff"] == 0.0


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_fp8_compiled_image_matches_eager_fp8(cuda_graphs):
    """The oracle for compiled fp8: the same quantized pipeline run eagerly. (On the H200 a compiled
    fp8 SDXL image came out far from the unquantized one, SSIM 0.04, where an eager fp8 check had
    given 46.8 dB: this pins whether compiling, or replaying CUDA graphs, changes the image.)"""
    from onediffx.compile import compile_options, compile_pipe

    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs a CUDA GPU of compute capability 8.9 or newer")
    pipe = quantize_pipe(_quiet(tiny_sdxl()).to("cuda", torch.bfloat16), "fp8")
    gen = lambda: pipe("a photo of an astronaut", num_inference_steps=4, height=64, width=64,  # noqa: E731
                       generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    eager = gen()
    compile_pipe(pipe, "inductor", compile_options("inductor", components=["unet"], cuda_graphs=cuda_graphs))
    gen()  # compiles (and, with CUDA graphs, is the uncaptured first call)
    compiled = gen()
    u8 = lambda a: (np.nan_to_num(a) * 255).round().astype(np.uint8)  # noqa: E731
    psnr, _ = image_fidelity(u8(eager), u8(compiled))
    assert psnr >= 30, f"compiled fp8 (cuda_graphs={cuda_graphs}) is {psnr:.1f} dB from eager fp8"


# --- zero rows: SDXL's empty negative prompt, zero-initialised weights ---------------------------------


def _cross_kv_reasons(skipped: dict) -> dict:
    return {n: why for n, why in skipped.items() if why.startswith("cross-attention key/value")}


def test_int8_gives_an_all_zero_activation_row_its_bias():
    """torchao's int8 dynamic activation scale is clamped to float32's eps: a zero row stays zero."""
    from torchao.quantization import quantize_

    from onediffx.quantize.modes import torchao_config

    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 48)
    reference = torch.nn.Linear(64, 48)
    reference.load_state_dict(layer.state_dict())
    quantize_(layer, torchao_config("int8"))
    x = torch.randn(6, 64)
    x[2] = 0
    with torch.no_grad():
        got, expected = layer(x), reference(x)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got[2], reference.bias.detach(), rtol=0, atol=1e-6)
    assert ((got - expected).norm() / expected.norm()).item() < 0.02


def test_fp8_activation_bound_turns_a_zero_row_from_nan_into_zeros():
    """torchao's own fp8 activation quantization (the path a fp8 linear takes), run on the CPU."""
    from torchao.quantization.quantize_.common.quantize_tensor_kwargs import _choose_quant_func_and_quantize_tensor
    from torchao.quantization.quantize_.workflows import Float8Tensor, QuantizeTensorToFloat8Kwargs

    from onediffx.quantize.modes import FP8_ACTIVATION_LB, torchao_config

    config = torchao_config("fp8")
    assert config.activation_value_lb == FP8_ACTIVATION_LB > 0
    torch.manual_seed(0)
    x = torch.randn(8, 64, dtype=torch.bfloat16)
    x[3] = 0
    x[5] *= 1e-6  # small but far above the bound: its scale must not change

    def quantized(lb):
        kwargs = QuantizeTensorToFloat8Kwargs(config.activation_dtype, config.granularity[0], hp_value_lb=lb)
        return _choose_quant_func_and_quantize_tensor(x, kwargs)

    bounded, unbounded = quantized(config.activation_value_lb), quantized(None)
    assert torch.isnan(unbounded.dequantize()[3]).all()  # the bug: scale 0, 0/0
    out = bounded.dequantize()
    assert torch.isfinite(out).all() and (out[3] == 0).all()
    rows = [i for i in range(8) if i != 3]
    assert torch.equal(bounded.scale[rows], unbounded.scale[rows])
    assert torch.equal(bounded.qdata[rows].view(torch.uint8), unbounded.qdata[rows].view(torch.uint8))
    # weights have no such bound in torchao: a zero weight row quantizes to NaN, hence select's skip
    weight = torch.randn(32, 64, dtype=torch.bfloat16)
    weight[7] = 0
    assert torch.isnan(Float8Tensor.from_hp(weight, granularity=config.granularity[1]).dequantize()[7]).all()


@pytest.mark.parametrize("mode", ["fp8", "fp8_weight_only"])
def test_requantizing_an_fp8_weight_gives_torchaos_bits_without_torchaos_module_path(mode, monkeypatch):
    """A LoRA switch re-quantizes every weight it touches; fp8 weights take torchao's scale and cast
    functions directly. The oracle: torchao's own ``quantize_`` handler on the same new weight."""
    import torchao.quantization.quant_api as quant_api

    from onediffx import quantized_weights as weights
    from onediffx.quantize.modes import torchao_config

    monkeypatch.setattr(quant_api, "_check_hardware_support", lambda *_: None)  # fp8 math runs on the CPU too
    config = torchao_config(mode)
    torch.manual_seed(0)
    param = torch.nn.Parameter(weights.quantize_tensor(config, torch.randn(64, 96, dtype=torch.bfloat16)),
                               requires_grad=False)
    record = weights.QuantizedWeight("unet.layer", config, torch.bfloat16, None)  # held weakly by the registry
    weights.register(param, record)
    storage = [t.data_ptr() for t in inner_tensors(param)]
    fused = torch.randn(64, 96) * 3  # float32, as the LoRA fuse hands it over
    expected = inner_tensors(weights.quantize_tensor(config, fused.to(torch.bfloat16)))

    def handler_path(*_):
        raise AssertionError("an fp8 weight went through torchao's per-module path")

    monkeypatch.setattr(weights, "quantize_tensor", handler_path)
    weights.requantize(param, fused)
    got = inner_tensors(param)
    assert [t.data_ptr() for t in got] == storage  # written in place: compiled graphs read these tensors
    assert all(torch.equal(g.view(torch.uint8) if g.dtype == torch.float8_e4m3fn else g,
                           e.view(torch.uint8) if e.dtype == torch.float8_e4m3fn else e)
               for g, e in zip(got, expected, strict=True))


def _fp8_sdxl_with_two_loras(tmp_path, monkeypatch):
    """The tiny SDXL in bfloat16 with fp8 weights (weight-only: its math runs on the CPU), adapters
    ``a`` and ``b`` loaded and not fused."""
    import torchao.quantization.quant_api as quant_api

    monkeypatch.setattr(quant_api, "_check_hardware_support", lambda *_: None)  # fp8 math runs on the CPU too
    pipe = _quiet(tiny_sdxl()).to(dtype=torch.bfloat16)
    targets = lora_targets(pipe, components=("unet",))
    sources = [save_kohya(random_lora(targets, 2 + i, seed=30 + i, strength=0.5), tmp_path / f"f{i}.safetensors")
               for i in range(2)]
    quantize_pipe(pipe, "fp8_weight_only")
    for name, source in zip("ab", sources):
        lora.load_lora_and_optionally_fuse(pipe, str(source), name, fuse=False, offload_device="cpu")
    return pipe


@pytest.mark.parametrize("run_elements", [None, 4096], ids=["one-run-a-width", "small-runs"])
def test_fp8_lora_switches_stack_their_weights_and_give_each_weights_own_bits(run_elements, tmp_path, monkeypatch):
    """A switch on fp8 weights fuses them as rows of shared buffers and quantizes each buffer once,
    the parts of a fused q/k/v copy at their rows of it. The oracle, per quantized weight: its
    high-precision original plus each term, summed in float32 one weight at a time, then torchao's
    own ``quantize_`` handler. The high-precision originals (the parts' memory) never change."""
    from onediffx.lora import fuse as lora_fuse
    from onediffx import quantized_weights as weights

    if run_elements:
        monkeypatch.setattr(lora_fuse, "STACK_ELEMENTS", run_elements)
    pipe = _fp8_sdxl_with_two_loras(tmp_path, monkeypatch)
    before = _quantized(pipe)
    records = {id(p): record_of(p) for p in pipe.unet.parameters() if is_quantized(p)}
    originals = {k: r.original.clone() for k, r in records.items()}

    def one_at_a_time(name: str, weight: float) -> dict:
        sums = {}
        for target in lora.fuse.state_of(pipe).adapters[name].targets.values():
            param = target.param
            if id(param) not in records:  # left in high precision: fused as any other weight
                continue
            acc = sums.setdefault(id(param), (param, records[id(param)].original.float()))[1]
            up, down = target.up.float(), target.down.float()
            acc[target.row:target.row + up.shape[0]].addmm_(up, down.reshape(up.shape[1], -1), alpha=weight * target.scale)
        return {id(param): inner_tensors(weights.quantize_tensor(records[id(param)].config, acc.to(torch.bfloat16)))
                for param, acc in sums.values()}

    def bits(tensors: list) -> list:
        return [t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t for t in tensors]

    def one_weight_path(*_):
        raise AssertionError("an fp8 weight was re-quantized on its own")

    monkeypatch.setattr(lora_fuse, "_write_quantized_one", one_weight_path)
    into = [t for t in lora.fuse.state_of(pipe).adapters["a"].targets.values() if t.into]
    assert len(into) >= 8 and {t.row for t in into} > {0}, "q/k/v LoRAs go to rows of the fused copies"
    for name, weight in [("a", 0.8), ("b", -0.6), ("a", 0.8)]:
        lora.set_and_fuse_adapters(pipe, [name], [weight])
        expected = one_at_a_time(name, weight)
        assert len(expected) > 20
        for key, tensors in expected.items():
            param = next(p for p in pipe.unet.parameters() if id(p) == key)
            assert all(torch.equal(g, e) for g, e in zip(bits(inner_tensors(param)), bits(tensors), strict=True))
    assert all(torch.equal(records[k].original, v) for k, v in originals.items()), "the originals must not change"
    lora.unfuse_lora(pipe)
    assert _same(_quantized(pipe), before), "unfuse must restore the quantized weights bit for bit"


def test_an_fp8_switch_that_fails_half_way_is_undone_by_the_next_fuse(tmp_path, monkeypatch):
    """Out of memory in the middle of a switch leaves some fp8 weights re-quantized and others not;
    they count as fused from the start, so unfusing restores every one bit for bit, and fusing again
    gives the bits a switch that never failed gives."""
    from onediffx import quantized_weights as weights

    pipe = _fp8_sdxl_with_two_loras(tmp_path, monkeypatch)
    before = _quantized(pipe)
    lora.set_and_fuse_adapters(pipe, ["a"], [0.8])
    clean = _quantized(pipe)
    lora.unfuse_lora(pipe)
    calls, requantize_rows = [], weights.requantize_rows

    def out_of_memory_on_the_third_run(params, rows):
        calls.append(len(params))
        if len(calls) == 3:
            raise torch.OutOfMemoryError("simulated: out of memory half-way through a switch")
        requantize_rows(params, rows)

    monkeypatch.setattr(weights, "requantize_rows", out_of_memory_on_the_third_run)
    with pytest.raises(torch.OutOfMemoryError):
        lora.set_and_fuse_adapters(pipe, ["b"], [-0.6])
    assert not _same(_quantized(pipe), before), "the first runs were written"
    monkeypatch.setattr(weights, "requantize_rows", requantize_rows)
    lora.unfuse_lora(pipe)
    assert _same(_quantized(pipe), before), "unfuse must restore every weight, the half-written ones too"
    with pytest.raises(torch.OutOfMemoryError):
        monkeypatch.setattr(weights, "requantize_rows", out_of_memory_on_the_third_run)
        calls.clear()
        lora.set_and_fuse_adapters(pipe, ["b"], [-0.6])
    monkeypatch.setattr(weights, "requantize_rows", requantize_rows)
    lora.set_and_fuse_adapters(pipe, ["a"], [0.8])
    assert _same(_quantized(pipe), clean), "fusing after a failed switch gives the bits of one that never failed"


def test_selection_of_cross_attention_kv_and_of_zero_weight_rows_in_fp8():
    from onediffx.fused_qkv import fuse_qkv
    from onediffx.quantize.select import select

    unet = tiny_sdxl().unet
    cross = [n for n, m in unet.named_modules() if getattr(m, "is_cross_attention", False)]
    assert cross and all(".attn2" in n for n in cross)
    unfused = {f"unet.{a}.{p}" for a in cross for p in ("to_k", "to_v")}
    for mode in ("int8", "fp8"):
        got = select(unet, "unet", QuantizeConfig(mode=mode, cross_attention_kv=False))
        assert set(_cross_kv_reasons(got.skipped)) == unfused and not unfused & set(got.chosen)
        assert any(n.endswith(".attn2.to_q") for n in got.chosen)  # the queries read the image tokens
    for options in (QuantizeConfig(mode="int8"), QuantizeConfig(mode="fp8"), QuantizeConfig(mode="int8_weight_only")):
        got = select(unet, "unet", options)  # the default: quantized, for the memory they hold
        assert unfused <= set(got.chosen) and not _cross_kv_reasons(got.skipped)
    # a zero-initialised output row (as in an untrained ControlNet): fp8 leaves the layer alone, int8 not
    name = next(n for n in select(unet, "unet", QuantizeConfig(mode="fp8")).chosen if n.endswith("ff.net.2"))
    with torch.no_grad():
        unet.get_submodule(name.removeprefix("unet.")).weight[5] = 0
    assert select(unet, "unet", QuantizeConfig(mode="fp8")).skipped[name].startswith("zero weight rows (1 of ")
    assert select(unet, "unet", QuantizeConfig(mode="fp8_weight_only")).skipped[name].startswith("zero weight rows")
    assert name in select(unet, "unet", QuantizeConfig(mode="int8")).chosen
    fuse_qkv(unet)  # what quantize_pipe does first: cross-attentions get a to_kv copy
    got = select(unet, "unet", QuantizeConfig(mode="fp8", cross_attention_kv=False))
    assert set(_cross_kv_reasons(got.skipped)) == {f"unet.{a}.to_kv" for a in cross}
    assert {f"unet.{a}.to_kv" for a in cross} <= set(select(unet, "unet", QuantizeConfig(mode="fp8")).chosen)
    assert all(got.skipped[n].startswith("unused") for n in unfused)


def test_int8_sdxl_with_an_empty_negative_prompt_stays_finite():
    """SDXL's empty negative prompt is all zeros (force_zeros_for_empty_prompt): the unconditional
    half of every step feeds zero rows to the cross-attentions."""
    pipe = _quiet(tiny_sdxl())
    assert pipe.config.force_zeros_for_empty_prompt
    _, negative, _, _ = pipe.encode_prompt("a cat", do_classifier_free_guidance=True)
    assert (negative == 0).all()
    gen = lambda p: p("a cat", num_inference_steps=2, height=64, width=64, guidance_scale=5.0,  # noqa: E731
                      generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    reference = gen(pipe)
    quantize_pipe(pipe, "int8")
    state = quantize_state(pipe)  # the cross-attention keys/values take the zero rows quantized
    kv = [n for n in state.layers if n.endswith(".attn2.to_kv")]
    assert kv and not _cross_kv_reasons(state.skipped)
    image = gen(pipe)
    assert np.isfinite(image).all()
    psnr, _ = image_fidelity((reference * 255).round().astype(np.uint8), (image * 255).round().astype(np.uint8))
    assert MIN_PSNR_DB <= psnr < float("inf")
