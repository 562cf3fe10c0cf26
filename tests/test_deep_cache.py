"""DeepCache on the tiny pipelines: the ``DeepCache`` package is the oracle, diffusers the baseline."""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from onediffx.config.schema import RunConfig
from onediffx.deep_cache import (
    DeepCacheParams,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    StableVideoDiffusionPipeline,
    deep_cache,
    deep_cache_class,
    helper_branch_id,
    pipeline_unet,
)
from onediffx.deep_cache.config import DeepCacheConfig
from onediffx.deep_cache.layout import replay_plan, skip_index_from_branch, skip_index_from_layer_block
from onediffx.deep_cache.schedule import nonuniform, uniform
from onediffx.errors import ConfigError
from onediffx.models.tiny import tiny_controlnet, tiny_sd, tiny_sdxl, tiny_svd
from onediffx.stages.base import Assembly, read_options
from onediffx.stages.deepcache import DeepCacheStage

STEPS = 4
ARCH_DIR = Path(__file__).resolve().parent.parent / "onediffx" / "models" / "arch"


def generate(pipe, steps: int = STEPS, **kwargs) -> np.ndarray:
    generator = torch.Generator().manual_seed(kwargs.pop("seed", 0))
    out = pipe(prompt="a red cube", num_inference_steps=steps, height=64, width=64, generator=generator,
               output_type="np", **kwargs)
    return out.images


def with_helper(pipe, interval: int, branch_id: int) -> np.ndarray:
    from DeepCache import DeepCacheSDHelper

    helper = DeepCacheSDHelper(pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=branch_id)
    helper.enable()
    try:
        return generate(pipe)
    finally:
        helper.disable()


def control_image(size: int = 64):
    from PIL import Image

    return Image.fromarray((np.random.RandomState(0).rand(size, size, 3) * 255).astype("uint8"))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and lose a lot when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sd():
    pipe = tiny_sd()
    pipe.set_progress_bar_config(disable=True)
    return pipe, generate(pipe)


@pytest.fixture(scope="module")
def sdxl():
    pipe = tiny_sdxl()
    pipe.set_progress_bar_config(disable=True)
    return pipe, generate(pipe)


# -- the oracle ------------------------------------------------------------------------------------


@pytest.mark.parametrize("model,interval,layer,block", [
    ("sd", 2, 0, 0), ("sd", 3, 1, 1), ("sd", 3, 0, 2), ("sdxl", 3, 0, 1), ("sdxl", 2, 1, 0),
])
def test_matches_deepcache_helper(request, model, interval, layer, block):
    pipe, uncached = request.getfixturevalue(model)
    expected = with_helper(pipe, interval, helper_branch_id(pipeline_unet(pipe), layer, block))
    with deep_cache(pipe, DeepCacheParams(interval, layer, block)):
        got = generate(pipe)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    assert np.abs(got - uncached).max() > 1e-3  # caching really changed the computation


def test_interval_one_is_uncached(sd):
    pipe, uncached = sd
    with deep_cache(pipe, DeepCacheParams(cache_interval=1)):
        got = generate(pipe)
    np.testing.assert_allclose(got, uncached, atol=1e-6, rtol=0)


def test_each_call_starts_fresh(sd):
    """A call in between, with another seed and step count, leaves no trace on the next call."""
    pipe, uncached = sd
    params = DeepCacheParams(cache_interval=3, cache_layer_id=0, cache_block_id=1)
    with deep_cache(pipe, params):
        first = generate(pipe)
    with deep_cache(pipe, params):
        generate(pipe, steps=4, seed=7)
    with deep_cache(pipe, params):
        again = generate(pipe)
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(generate(pipe), uncached)  # disarmed after the block


# -- the branch naming ------------------------------------------------------------------------------


def test_ids_map_to_helper_branch_ids_on_tiny_unet(sd):
    unet = pipeline_unet(sd[0])
    # down block 0: resnet 0, resnet 1, downsampler; down block 1 (last): resnet 0, resnet 1
    assert [helper_branch_id(unet, L, B) for L, B in [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]] == [1, 2, 3, 4, 5]


def _meta_unet(arch: str):
    path = ARCH_DIR / f"{arch}.json"
    if not path.exists():
        pytest.skip(f"no {path.name}")
    entry = json.loads(path.read_text())["components"]["unet"]
    with torch.device("meta"):
        return getattr(diffusers, entry["class"]).from_config(entry["config"])


@pytest.mark.parametrize("arch,blocks", [("sd15", [3, 3, 3, 2]), ("sdxl", [3, 3, 2]), ("svd", [3, 3, 3, 2])])
def test_full_size_layouts(arch, blocks):
    unet = _meta_unet(arch)
    for L, n in enumerate(blocks):
        for B in range(n):
            assert skip_index_from_layer_block(unet, L, B) == 3 * L + B + 1
        with pytest.raises(ConfigError, match=rf"valid 0\.\.{n - 1}"):
            skip_index_from_layer_block(unet, L, n)
    with pytest.raises(ConfigError, match=rf"valid 0\.\.{len(blocks) - 1}"):
        skip_index_from_layer_block(unet, len(blocks), 0)
    # the shallowest OneDiffX branch recomputes conv_in and down block 0's first resnet, replays the rest
    down0, up_last = unet.down_blocks[0], unet.up_blocks[-1]
    last = len(blocks) - 1
    expected = (
        ["down_blocks.0.resnets.1"] + (["down_blocks.0.attentions.1"] if hasattr(down0, "attentions") else [])
        + ["down_blocks.0.downsamplers.0"] + [f"down_blocks.{b}" for b in range(1, len(blocks))] + ["mid_block"]
        + [f"up_blocks.{i}" for i in range(last)] + [f"up_blocks.{last}.resnets.0"]
        + ([f"up_blocks.{last}.attentions.0"] if hasattr(up_last, "attentions") else [])
    )
    assert [name for name, _ in replay_plan(unet, skip_index_from_layer_block(unet, 0, 0))] == expected


# -- the pipeline classes ---------------------------------------------------------------------------


def test_pipeline_class_without_cache_args_is_diffusers(sd):
    base, uncached = sd
    pipe = StableDiffusionPipeline(**base.components, requires_safety_checker=False)
    assert isinstance(pipe, diffusers.StableDiffusionPipeline) and type(pipe).__name__ == "StableDiffusionPipeline"
    np.testing.assert_array_equal(generate(pipe), uncached)


def test_pipeline_class_with_cache_args(sdxl):
    base, uncached = sdxl
    pipe = StableDiffusionXLPipeline(**base.components)
    args = dict(cache_interval=3, cache_layer_id=1, cache_block_id=0)
    first, second = generate(pipe, **args), generate(pipe, **args)
    np.testing.assert_array_equal(first, second)
    with deep_cache(base, DeepCacheParams(3, 1, 0)):
        np.testing.assert_array_equal(first, generate(base))
    assert np.abs(first - uncached).max() > 1e-3
    np.testing.assert_array_equal(generate(pipe), uncached)


def test_enable_then_disable_round_trip(sd):
    """``enable`` caches every call that passes no cache arguments; ``disable`` gives back the plain pipeline."""
    from onediffx.deep_cache import disable, enable, enabled
    from onediffx.hooks import DEEP_CACHE_DISPATCH, has_hook
    from onediffx.state import DEEP_CACHE

    base, uncached = sd
    pipe = diffusers.StableDiffusionPipeline(**base.components, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    params = DeepCacheParams(3, 0, 1)
    state = enable(pipe, params)
    assert enabled(pipe) is params and DEEP_CACHE.get(pipe) is params and state.skip_index == 2
    assert type(pipe).__name__ == "StableDiffusionPipeline" and has_hook(pipe.unet, DEEP_CACHE_DISPATCH)
    cached = generate(pipe)
    with deep_cache(base, params):
        np.testing.assert_array_equal(cached, generate(base))
    assert np.abs(cached - uncached).max() > 1e-3
    assert disable(pipe) is params
    assert enabled(pipe) is None and not has_hook(pipe.unet, DEEP_CACHE_DISPATCH)
    plain = generate(pipe)
    assert torch.equal(torch.from_numpy(plain), torch.from_numpy(uncached))
    assert disable(pipe) is None  # a second disable finds nothing to undo


def test_svd_with_cache_branch():
    pipe = StableVideoDiffusionPipeline(**tiny_svd().components)
    pipe.set_progress_bar_config(disable=True)

    def frames(**cache):
        generator = torch.Generator().manual_seed(0)
        return pipe(control_image(32), height=32, width=32, num_frames=2, num_inference_steps=3,
                    decode_chunk_size=2, generator=generator, output_type="np", **cache).frames

    uncached, cached = frames(), frames(cache_interval=2, cache_branch=0)
    assert cached.shape == uncached.shape and np.isfinite(cached).all()
    assert np.abs(cached - uncached).max() > 1e-4
    np.testing.assert_array_equal(cached, frames(cache_interval=2, cache_branch=0))
    with pytest.raises(ConfigError, match=r"cache_branch=5 .*valid 0\.\.4"):
        frames(cache_interval=2, cache_branch=5)


def test_controlnet_pipeline():
    pipe = tiny_controlnet()
    pipe.set_progress_bar_config(disable=True)
    image = control_image()
    uncached = generate(pipe, image=image)
    pipe.__class__ = deep_cache_class(type(pipe))
    cached = generate(pipe, image=image, cache_interval=2, cache_layer_id=0, cache_block_id=1)
    assert np.isfinite(cached).all() and np.abs(cached - uncached).max() > 1e-3
    np.testing.assert_array_equal(cached, generate(pipe, image=image, cache_interval=2, cache_layer_id=0,
                                                   cache_block_id=1))


# -- the stage --------------------------------------------------------------------------------------


def assembly(pipe, **deepcache) -> Assembly:
    cfg = OmegaConf.structured(RunConfig)
    cfg.deepcache = OmegaConf.merge(cfg.deepcache, {"enabled": True, **deepcache})
    return Assembly(pipe=pipe, cfg=cfg, device=torch.device("cpu"), dtype=torch.float32)


def test_stage_matches_pipeline_class():
    asm = assembly(tiny_sd(), cache_interval=3, cache_layer_id=0, cache_block_id=1)
    stage = DeepCacheStage()
    options = read_options(stage, asm.cfg)
    assert isinstance(options, DeepCacheConfig) and (options.cache_interval, options.cache_block_id) == (3, 1)
    assert stage.enabled(asm, options)
    stage.apply(asm, options)
    assert isinstance(asm.pipe, diffusers.StableDiffusionPipeline)
    assert asm.report["deepcache"]["skip_index"] == 2
    reference = StableDiffusionPipeline(**tiny_sd().components, requires_safety_checker=False)
    expected = generate(reference, cache_interval=3, cache_layer_id=0, cache_block_id=1)
    np.testing.assert_array_equal(generate(asm.pipe), expected)
    np.testing.assert_array_equal(generate(asm.pipe, cache_interval=1), generate(reference))


@pytest.mark.parametrize("ids,match", [
    ({"cache_layer_id": 2}, r"deepcache\.cache_layer_id=2 .*valid 0\.\.1"),
    ({"cache_block_id": 3}, r"deepcache\.cache_block_id=3 .*valid 0\.\.2"),
    ({"cache_layer_id": 1, "cache_block_id": 2}, r"deepcache\.cache_block_id=2 .*valid 0\.\.1"),
])
def test_stage_rejects_out_of_range_ids(ids, match):
    with pytest.raises(ConfigError, match=match):
        asm = assembly(tiny_sd(), **ids)
        DeepCacheStage().apply(asm, read_options(DeepCacheStage, asm.cfg))


def test_stage_rejects_unsupported_pipeline_in_one_line():
    pipe = diffusers.DDPMPipeline(
        unet=diffusers.UNet2DModel(sample_size=8, block_out_channels=(32, 64), norm_num_groups=32,
                                   down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2),
        scheduler=diffusers.DDPMScheduler(),
    )
    with pytest.raises(ConfigError, match="DDPMPipeline is not supported .*UNet2DModel") as err:
        asm = assembly(pipe)
        DeepCacheStage().apply(asm, read_options(DeepCacheStage, asm.cfg))
    assert "\n" not in str(err.value)


def test_stage_check_rejects_bad_values():
    with pytest.raises(ConfigError, match=r"deepcache\.cache_interval=0"):
        read_options(DeepCacheStage, assembly(None, cache_interval=0).cfg)
    with pytest.raises(ConfigError, match=r"deepcache\.cache_layer_id=-1 must be >= 0"):
        read_options(DeepCacheStage, assembly(None, cache_layer_id=-1).cfg)
    off = assembly(None, cache_interval=0).cfg
    off.deepcache.enabled = False
    assert read_options(DeepCacheStage, off).cache_interval == 0  # a disabled group's values are never used
    with pytest.raises(ValidationError, match=r"Invalid value 'quadratic', expected one of \[uniform, nonuniform\]"):
        assembly(None, schedule="quadratic")  # an Enum: the config refuses it at composition
    with pytest.raises(ConfigError, match=r"schedule='quadratic' is not one of: uniform, nonuniform"):
        DeepCacheParams(schedule="quadratic").validate()  # Python callers get the same check


@pytest.mark.parametrize("preset,interval", [("i2", 2), ("i3", 3), ("i5", 5)])
def test_presets_compose(compose_run, preset, interval):
    cfg = compose_run(f"deepcache={preset}")
    assert cfg.deepcache.enabled and cfg.deepcache.cache_interval == interval
    assert not compose_run("deepcache=off").deepcache.enabled


# -- schedule, LoRA, benchmark ----------------------------------------------------------------------


def test_nonuniform_schedule():
    for steps, interval in [(50, 3), (30, 2), (30, 5), (10, 3)]:
        full = nonuniform(steps, interval)
        assert full[0] == 0 and full == sorted(set(full)) and len(full) == len(uniform(steps, interval))
        gaps = np.diff(full + [steps])
        center = int(round(0.3 * steps))
        near = gaps[np.searchsorted(full, center) - 1]
        assert near <= interval <= gaps.max()  # denser around the center than at the ends
    assert nonuniform(6, 1) == list(range(6))


def test_nonuniform_run(sd):
    pipe, uncached = sd
    with deep_cache(pipe, DeepCacheParams(cache_interval=2, schedule="nonuniform")):
        got = generate(pipe, steps=8)
    with deep_cache(pipe, DeepCacheParams(cache_interval=2)):
        uniform_image = generate(pipe, steps=8)
    assert np.isfinite(got).all() and not np.array_equal(got, uniform_image)


def test_lora_fuse_while_deep_cache_is_on(tmp_path):
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    source = tiny_sd()
    torch.manual_seed(3)
    source.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                       target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(source.unet))
    diffusers.StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=layers)

    def fuse(pipe):
        pipe.load_lora_weights(tmp_path, weight_name="pytorch_lora_weights.safetensors")
        pipe.fuse_lora()
        pipe.unload_lora_weights()

    args = dict(cache_interval=2, cache_layer_id=0, cache_block_id=1)
    on = StableDiffusionPipeline(**tiny_sd().components, requires_safety_checker=False)
    on.set_progress_bar_config(disable=True)
    before = generate(on, **args)  # hooks are installed from here on
    names = [n for n, _ in on.unet.named_parameters()]
    fuse(on)
    after = generate(on, **args)
    assert [n for n, _ in on.unet.named_parameters()] == names
    fresh = StableDiffusionPipeline(**tiny_sd().components, requires_safety_checker=False)
    fresh.set_progress_bar_config(disable=True)
    fuse(fresh)
    np.testing.assert_allclose(after, generate(fresh, **args), atol=1e-6, rtol=0)
    assert np.abs(after - before).max() > 1e-3


def test_bench_on_tiny_pipe():
    from onediffx.bench.deepcache import run_deepcache_bench

    pipe = tiny_sd()
    pipe.set_progress_bar_config(disable=True)
    rows = run_deepcache_bench(pipe, "cpu", intervals=(2,), steps=4, height=64, width=64, warmup=0,
                               fresh=lambda: tiny_sd())
    by = {(r["method"], r["interval"]): r for r in rows}
    assert set(by) == {("diffusers", None), ("DeepCache package", 2), ("onediffx deepcache", 2),
                       ("diffusers (again, fresh pipeline)", None)}
    assert by[("diffusers", None)]["psnr_db"] == float("inf")
    assert by[("diffusers (again, fresh pipeline)", None)]["psnr_db"] == float("inf")  # same weights, same image
    eager = [by[(m, None)] for m in ("diffusers", "diffusers (again, fresh pipeline)")]
    assert max(r["speedup"] for r in eager) == 1.0  # speed-ups are against the faster eager row
    helper, ours = by[("DeepCache package", 2)], by[("onediffx deepcache", 2)]
    assert np.isfinite(ours["psnr_db"]) and ours["psnr_db"] == helper["psnr_db"]
    assert all(r["latency_s"] > 0 and r["speedup"] > 0 for r in rows)
