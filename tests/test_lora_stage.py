"""The ``lora-fuse`` stage and the ``conf/lora`` entries."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import onediffx.lora as lora
from onediffx.config.schema import LoraEntry, RunConfig
from onediffx.errors import ConfigError, NotFoundError
from onediffx.lora import LoraMismatchError
from onediffx.lora.fuse import state_of
from onediffx.lora.synthetic import lora_targets, random_lora, save_kohya
from onediffx.models.tiny import tiny_sd, tiny_sdxl
from onediffx.registry import get_stage
from onediffx.resources import conf_dir
from onediffx.stages.base import Assembly, read_options

CONF_LORA = conf_dir() / "lora"


def weights(pipe) -> dict:
    return {(c, n): p.detach().clone() for c in ("unet", "text_encoder", "text_encoder_2")
            for n, p in getattr(pipe, c).named_parameters()}


def run_config(**entries) -> OmegaConf:
    cfg = OmegaConf.structured(RunConfig)
    cfg.model.pipeline, cfg.model.name = "StableDiffusionXLPipeline", "tiny_xl"
    for key, entry in entries.items():
        cfg.lora[key] = LoraEntry(**entry)
    return cfg


def lora_stage(cfg):
    """The stage and its typed options, as ``plan()`` makes them."""
    stage = get_stage("lora-fuse")()
    return stage, read_options(stage, cfg)


@pytest.fixture
def two_files(tmp_path):
    targets = lora_targets(tiny_sdxl())
    return [save_kohya(random_lora(targets, 4, seed=s), tmp_path / f"l{s}.safetensors") for s in (1, 2)]


def test_stage_fuses_the_stack_like_the_api(two_files):
    import onediffx.stages  # noqa: F401  (registers the stages)

    cfg = run_config(first={"source": str(two_files[0]), "scale": 0.8},
                     second={"source": str(two_files[1]), "scale": -0.5, "adapter_name": "custom"})
    stage, stack = lora_stage(cfg)
    assert [e.adapter_name for e in stack.entries.values()] == ["first", "custom"]  # the key, unless given
    stage.check(stack, cfg)
    asm = Assembly(pipe=tiny_sdxl(), cfg=cfg, device=torch.device("cpu"), dtype=torch.float32)
    original = weights(asm.pipe)
    assert stage.enabled(asm, stack)
    stage.apply(asm, stack)

    reference = tiny_sdxl()
    for name, path in (("first", two_files[0]), ("custom", two_files[1])):
        lora.load_lora_and_optionally_fuse(reference, str(path), name, fuse=False)
    lora.set_and_fuse_adapters(reference, ["first", "custom"], [0.8, -0.5])
    got, expected = weights(asm.pipe), weights(reference)
    assert any(not torch.equal(got[k], original[k]) for k in got)
    assert all(torch.equal(got[k], expected[k]) for k in got)
    assert asm.report["lora-fuse"]["adapters"] == {"first": 0.8, "custom": -0.5}
    assert asm.report["lora-fuse"]["originals"] == "cpu"
    assert list(state_of(asm.pipe).active) == ["first", "custom"]


def test_originals_on_the_device_fuse_the_same_and_switch_exactly(two_files):
    """``lora_originals=device`` (serve's default) keeps W0 beside the weights: the same fused
    weights as the run's CPU copies, and switching back and forth returns to them exactly."""
    import onediffx.stages  # noqa: F401  (registers the stages)

    cfg = run_config(first={"source": str(two_files[0])}, second={"source": str(two_files[1]), "scale": 0.5})
    cfg.lora_originals = "device"
    asm = Assembly(pipe=tiny_sdxl(), cfg=cfg, device=torch.device("cpu"), dtype=torch.float32)
    lora_stage(cfg)[0].apply(asm, lora_stage(cfg)[1])
    assert asm.report["lora-fuse"]["originals"] == "device"
    reference = Assembly(pipe=tiny_sdxl(), cfg=run_config(first={"source": str(two_files[0])},
                         second={"source": str(two_files[1]), "scale": 0.5}), device=torch.device("cpu"),
                         dtype=torch.float32)
    lora_stage(reference.cfg)[0].apply(reference, lora_stage(reference.cfg)[1])
    fused, expected = weights(asm.pipe), weights(reference.pipe)
    assert all(torch.equal(fused[k], expected[k]) for k in fused)
    for names, scales in ((["second"], [1.0]), (["first", "second"], [1.0, 0.5])):
        lora.set_and_fuse_adapters(asm.pipe, names, scales)
    assert all(torch.equal(v, fused[k]) for k, v in weights(asm.pipe).items())


def test_stage_is_a_no_op_without_loras():
    cfg = run_config()
    asm = Assembly(pipe=None, cfg=cfg, device=torch.device("cpu"), dtype=torch.float32)
    stage, stack = lora_stage(cfg)
    assert not stage.enabled(asm, stack)


def test_stage_refuses_missing_and_misfit_loras_naming_the_entry(two_files, tmp_path):
    def check(cfg):
        stage, stack = lora_stage(cfg)
        stage.check(stack, cfg)

    with pytest.raises(NotFoundError, match=r"^lora\.gone: LoRA .*gone\.safetensors: no such file"):
        check(run_config(gone={"source": str(tmp_path / "gone.safetensors")}))
    with pytest.raises(ConfigError, match=r"lora\.old: made for sd15 but model tiny_xl is sdxl"):
        check(run_config(old={"source": str(two_files[0]), "base": "sd15"}))
    flux = run_config(xl={"source": str(two_files[0]), "base": "sdxl"})
    flux.model.pipeline, flux.model.name = "FluxPipeline", "tiny_flux"
    with pytest.raises(ConfigError, match=r"lora\.xl: made for sdxl but model tiny_flux is flux"):
        check(flux)
    with pytest.raises(ConfigError, match=r"^lora\.b: adapter name 'a' is also used by lora\.a$"):
        check(run_config(a={"source": str(two_files[0])}, b={"source": str(two_files[1]), "adapter_name": "a"}))

    # an SD 1.5 LoRA after a good one: nothing is fused, nothing stays loaded
    sd15 = save_kohya(random_lora(lora_targets(tiny_sd()), 4, seed=3), tmp_path / "sd15.safetensors",
                      te_prefixes=("lora_te_", ""))
    cfg = run_config(good={"source": str(two_files[0])}, sd15={"source": str(sd15)})
    check(cfg)
    asm = Assembly(pipe=tiny_sdxl(), cfg=cfg, device=torch.device("cpu"), dtype=torch.float32)
    before = weights(asm.pipe)
    with pytest.raises(LoraMismatchError, match=r"^lora\.sd15: LoRA .*sd15\.safetensors does not fit"):
        lora_stage(cfg)[0].apply(asm, lora_stage(cfg)[1])
    assert all(torch.equal(v, before[k]) for k, v in weights(asm.pipe).items())
    assert not state_of(asm.pipe).adapters


def test_conf_entries_are_packaged_and_valid():
    files = sorted(CONF_LORA.glob("*.yaml"))
    names = {p.stem for p in files}
    assert {"emoji", "metal", "simple_drawing", "texta", "watercolor", "lcm_sd15", "lcm_sdxl"} <= names
    for path in files:
        assert path.read_text().splitlines()[0] == f"# @package lora.{path.stem}"
        entry = OmegaConf.merge(OmegaConf.structured(LoraEntry), OmegaConf.load(path))
        assert entry.source and entry.base in ("sd15", "sdxl") and entry.scale == 1.0


def test_stack_composes_in_list_order_with_overrides(compose_run, monkeypatch, tmp_path):
    monkeypatch.setenv("ONEDIFFX_LORA_DIR", str(tmp_path))
    cfg = compose_run("model=tiny_xl", "lora=[metal,emoji]", "lora.emoji.scale=0.3")
    assert list(cfg.lora) == ["metal", "emoji"]
    assert cfg.lora.emoji.scale == 0.3 and cfg.lora.metal.source == f"{tmp_path}/sdxl_metal_lora.safetensors"
    with pytest.raises(NotFoundError, match=r"^lora\.metal: .*sdxl_metal_lora\.safetensors: no such file"):
        stage, stack = lora_stage(cfg)
        stage.check(stack, cfg)
