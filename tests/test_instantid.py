"""InstantID (onediffx.instantid) on the built-in tiny model, against independent computations.

One module-scoped tiny InstantID pipeline serves the eager tests; the oracle is InstantID's
arithmetic written out here (the published Resampler and IP attention, a hand-written denoising
loop) on a separately built copy of the same seeded weights, in the published key layout.
"""

from __future__ import annotations

import json
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from conftest import job_dirs, run_cli
from onediffx.deep_cache import DeepCacheParams, deep_cache
from onediffx.instantid import (draw_kps, face_embeds, load_face, read_face_adapter, convert,
                                set_ip_adapter_scale, synthetic_face_adapter)
from onediffx.instantid.face import FaceError
from onediffx.instantid.hook import IDENTITYNET
from onediffx.hooks import get_hook
from onediffx.models.tiny import SEED, tiny_controlnet_xl, tiny_instantid, tiny_sdxl

PROMPT = "a photo of an astronaut riding a horse on the moon"  # the CLI's default
SIZE, STEPS, GUIDANCE = 64, 2, 5.0
KPS = [[20.0, 22.0], [44.0, 22.0], [32.0, 33.0], [23.0, 45.0], [41.0, 45.0]]


@pytest.fixture(scope="module")
def face_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("face")
    embedding = np.random.default_rng(7).standard_normal(512).astype(np.float32) * 3
    np.save(folder / "face.npy", embedding)
    (folder / "kps.json").write_text(json.dumps({"kps": [[x * 10, y * 10] for x, y in KPS], "width": 640, "height": 640}))
    return folder, embedding


@pytest.fixture(scope="module")
def pipe():
    p = tiny_instantid()
    p.set_progress_bar_config(disable=True)
    return p


def _call(p, embedding, output_type="np", steps=STEPS, ip_scale=None, cn_scale=0.8, seed=0, **extra):
    if ip_scale is not None:
        set_ip_adapter_scale(p, ip_scale)
    return p(prompt=[PROMPT], image=draw_kps((SIZE, SIZE), KPS), ip_adapter_image_embeds=face_embeds(p, embedding, GUIDANCE),
             controlnet_conditioning_scale=cn_scale, num_inference_steps=steps, guidance_scale=GUIDANCE,
             height=SIZE, width=SIZE, generator=[torch.Generator().manual_seed(seed)], output_type=output_type,
             **extra).images


# --- the published arithmetic, written out independently ------------------------------------------------


class RefPerceiverAttention(nn.Module):
    def __init__(self, dim: int, dim_head: int, heads: int) -> None:
        super().__init__()
        self.heads, inner = heads, dim_head * heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x, latents):
        x, latents = self.norm1(x), self.norm2(latents)
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat((x, latents), dim=-2)).chunk(2, dim=-1)
        split = lambda t: t.reshape(t.shape[0], t.shape[1], self.heads, -1).transpose(1, 2)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        weight = torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-1)
        out = (weight @ v).transpose(1, 2).reshape(latents.shape[0], latents.shape[1], -1)
        return self.to_out(out)


class RefResampler(nn.Module):
    def __init__(self, dim=64, depth=4, dim_head=64, heads=1, num_queries=16, embedding_dim=512, output_dim=64, ff_mult=4):
        super().__init__()
        self.latents = nn.Parameter(torch.zeros(1, num_queries, dim))
        self.proj_in, self.proj_out, self.norm_out = nn.Linear(embedding_dim, dim), nn.Linear(dim, output_dim), nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList(nn.ModuleList([
            RefPerceiverAttention(dim, dim_head, heads),
            nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * ff_mult, bias=False), nn.GELU(),
                          nn.Linear(dim * ff_mult, dim, bias=False)),
        ]) for _ in range(depth))

    def forward(self, x):
        latents = self.latents.repeat(x.shape[0], 1, 1)
        x = self.proj_in(x)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


class RefIPAttention(nn.Module):
    """Decoupled cross-attention: text attention plus ``scale`` times attention over the face tokens."""

    def __init__(self, hidden: int, cross: int, scale: float, num_tokens: int = 16) -> None:
        super().__init__()
        self.scale, self.num_tokens = scale, num_tokens
        self.to_k_ip = nn.Linear(cross, hidden, bias=False)
        self.to_v_ip = nn.Linear(cross, hidden, bias=False)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        end = encoder_hidden_states.shape[1] - self.num_tokens
        text, face = encoder_hidden_states[:, :end], encoder_hidden_states[:, end:]
        heads = lambda t: t.reshape(t.shape[0], -1, attn.heads, t.shape[-1] // attn.heads).transpose(1, 2)  # noqa: E731
        q = heads(attn.to_q(hidden_states))
        out = F.scaled_dot_product_attention(q, heads(attn.to_k(text)), heads(attn.to_v(text)))
        ip = F.scaled_dot_product_attention(q, heads(self.to_k_ip(face)), heads(self.to_v_ip(face)))
        merge = lambda t: t.transpose(1, 2).reshape(t.shape[0], -1, t.shape[1] * t.shape[3])  # noqa: E731
        return attn.to_out[1](attn.to_out[0](merge(out) + self.scale * merge(ip)))


def _oracle_latents(embedding, ip_scale: float, cn_scale: float, identitynet: dict) -> torch.Tensor:
    base = tiny_controlnet_xl()  # the same seeded weights, without any IP-Adapter machinery
    base.controlnet.load_state_dict(identitynet)  # with the IdentityNet's output convolutions set
    raw = synthetic_face_adapter(base.unet, seed=SEED + 2, hidden=64, heads=1, dim_head=64)
    resampler = RefResampler(output_dim=base.unet.config.cross_attention_dim)
    resampler.load_state_dict(raw["image_proj"])
    processors = {}
    for i, (name, proc) in enumerate(base.unet.attn_processors.items()):
        if name.endswith("attn2.processor"):
            ref = RefIPAttention(raw["ip_adapter"][f"{i}.to_k_ip.weight"].shape[0], base.unet.config.cross_attention_dim, ip_scale)
            ref.load_state_dict({"to_k_ip.weight": raw["ip_adapter"][f"{i}.to_k_ip.weight"],
                                 "to_v_ip.weight": raw["ip_adapter"][f"{i}.to_v_ip.weight"]})
            processors[name] = ref
        else:
            processors[name] = proc
    base.unet.set_attn_processor(processors)
    with torch.no_grad():
        emb = torch.as_tensor(embedding).reshape(1, 1, 512)
        tokens = resampler(torch.cat([torch.zeros_like(emb), emb]))  # negative: the zero embedding
        pe, npe, pooled, npooled = base.encode_prompt(PROMPT, device=torch.device("cpu"), num_images_per_prompt=1, do_classifier_free_guidance=True)
        embeds, pooled2 = torch.cat([npe, pe]), torch.cat([npooled, pooled])
        time_ids = torch.tensor([[SIZE, SIZE, 0, 0, SIZE, SIZE]] * 2, dtype=embeds.dtype)
        cond = torch.from_numpy(np.asarray(draw_kps((SIZE, SIZE), KPS), dtype=np.float32) / 255).permute(2, 0, 1)[None]
        cond = torch.cat([cond, cond])
        sched = type(base.scheduler).from_config(base.scheduler.config)
        sched.set_timesteps(STEPS)
        f = base.vae_scale_factor
        lat = torch.randn((1, 4, SIZE // f, SIZE // f), generator=torch.Generator().manual_seed(0)) * sched.init_noise_sigma
        added = {"text_embeds": pooled2, "time_ids": time_ids}
        for t in sched.timesteps:
            x = sched.scale_model_input(torch.cat([lat, lat]), t)
            down, mid = base.controlnet(x, t, encoder_hidden_states=tokens, controlnet_cond=cond, conditioning_scale=cn_scale,
                                        added_cond_kwargs=added, return_dict=False)
            eps = base.unet(x, t, encoder_hidden_states=torch.cat([embeds, tokens], dim=1), added_cond_kwargs=added,
                            down_block_additional_residuals=down, mid_block_additional_residual=mid, return_dict=False)[0]
            uncond, text = eps.chunk(2)
            lat = sched.step(uncond + GUIDANCE * (text - uncond), t, lat, return_dict=False)[0]
    return lat


# --- tests --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def oracle(pipe, face_files):
    return _oracle_latents(face_files[1], 0.7, 0.8, pipe.controlnet.state_dict())


def test_matches_an_independent_computation_of_the_same_steps(pipe, face_files, oracle):
    _, embedding = face_files
    ours = _call(pipe, embedding, output_type="latent", ip_scale=0.7, cn_scale=0.8)
    assert ours.shape == oracle.shape
    assert torch.allclose(ours, oracle, atol=1e-4), (ours - oracle).abs().max()
    # the face matters: another face moves the latents by far more than the tolerance
    other = _call(pipe, -embedding, output_type="latent")
    assert (other - ours).abs().max() > 1e-2


def test_zero_scales_give_the_plain_sdxl_image(pipe, face_files, oracle):
    _, embedding = face_files
    instantid = _call(pipe, embedding, ip_scale=0.0, cn_scale=0.0)
    plain = tiny_sdxl()
    plain.set_progress_bar_config(disable=True)
    reference = plain(prompt=[PROMPT], num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=SIZE, width=SIZE,
                      generator=[torch.Generator().manual_seed(0)], output_type="np").images
    assert np.abs(instantid - reference).max() < 1e-5
    # the scale came back from 0 exactly: to_v_ip holds its loaded values again
    set_ip_adapter_scale(pipe, 0.7)
    again = _call(pipe, embedding, output_type="latent")
    assert torch.allclose(again, oracle, atol=1e-4)


def test_the_identitynet_reads_the_face_tokens_not_the_prompt(pipe, face_files):
    _, embedding = face_files
    seen = []

    def record(module, args, kwargs, output):
        seen.append((args, dict(kwargs), output))

    handle = pipe.controlnet.register_forward_hook(record, with_kwargs=True)
    try:
        _call(pipe, embedding, steps=1, ip_scale=0.7)
    finally:
        handle.remove()
    (args, kwargs, output), = seen
    assert kwargs["encoder_hidden_states"].shape[1] == 77  # the pipeline handed over the prompt ...
    emb = torch.as_tensor(embedding).reshape(1, 1, 512)
    resampler = pipe.unet.encoder_hid_proj.image_projection_layers[0]
    with torch.no_grad():
        tokens = resampler(torch.cat([torch.zeros_like(emb), emb]))
        direct = type(pipe.controlnet).forward(pipe.controlnet, *args, **{**kwargs, "encoder_hidden_states": tokens})
        with_prompt = type(pipe.controlnet).forward(pipe.controlnet, *args, **kwargs)
    for got, want in zip([*output[0], output[1]], [*direct[0], direct[1]]):
        assert torch.allclose(got, want, atol=1e-6)
    assert (with_prompt[1] - output[1]).abs().max() > 1e-3  # ... and the IdentityNet saw the face instead
    assert get_hook(pipe.controlnet, IDENTITYNET) is None and "forward" not in vars(pipe.controlnet)  # off between calls


def test_deepcache_skips_the_identitynet_on_cached_steps(pipe, face_files):
    _, embedding = face_files
    outputs = []
    handle = pipe.controlnet.register_forward_hook(lambda m, a, o: outputs.append(o))
    counts = pipe.__dict__.setdefault("identitynet_counts", {"calls": 0, "skipped": 0})
    before = dict(counts)
    try:
        with deep_cache(pipe, DeepCacheParams(cache_interval=2)):
            cached = _call(pipe, embedding, steps=4, ip_scale=0.7)
        pipe.identitynet_skips_cached_steps = False
        with deep_cache(pipe, DeepCacheParams(cache_interval=2)):
            running = _call(pipe, embedding, steps=4)
    finally:
        pipe.identitynet_skips_cached_steps = True
        handle.remove()
    assert counts["calls"] - before["calls"] == 8 and counts["skipped"] - before["skipped"] == 2
    assert outputs[1] is outputs[0] and outputs[3] is outputs[2]  # steps 1 and 3 reuse steps 0 and 2
    assert outputs[5] is not outputs[4]
    assert 0 < np.abs(cached - running).max() < 0.2  # an approximation of the run that computes them


def test_an_sdxl_lora_fuses_into_the_instantid_unet(pipe, face_files, tmp_path):
    """Fused as for SDXL, checked against diffusers' load_lora_weights + fuse_lora; unfusing restores exactly."""
    from onediffx.lora import load_and_fuse_lora, unfuse_lora
    from onediffx.lora.synthetic import lora_targets, random_lora, save_kohya

    _, embedding = face_files
    layers = random_lora(lora_targets(tiny_sdxl(), components=("unet",), conv=False), 4, seed=5, strength=0.5)
    path = save_kohya(layers, tmp_path / "lora.safetensors")
    before = _call(pipe, embedding, output_type="latent", ip_scale=0.7)
    load_and_fuse_lora(pipe, str(path))
    try:
        fused = _call(pipe, embedding, output_type="latent")
    finally:
        unfuse_lora(pipe)
    assert torch.equal(_call(pipe, embedding, output_type="latent"), before)
    reference = tiny_instantid()
    reference.set_progress_bar_config(disable=True)
    reference.load_lora_weights(str(path))
    reference.fuse_lora()
    expected = _call(reference, embedding, output_type="latent", ip_scale=0.7)
    assert (fused - before).abs().max() > 1e-3
    assert torch.allclose(fused, expected, atol=1e-4), (fused - expected).abs().max()


def test_face_files_round_trip_and_kps_scale_to_the_output(face_files):
    folder, embedding = face_files
    face = load_face(str(folder / "face.npy"), str(folder / "kps.json"))
    np.testing.assert_array_equal(face.embedding, embedding)
    np.testing.assert_allclose(face.kps_for(SIZE, SIZE), KPS)
    canvas = np.asarray(draw_kps((SIZE, SIZE), KPS))
    assert canvas.shape == (SIZE, SIZE, 3)
    assert tuple(canvas[22, 20]) == (255, 0, 0) and tuple(canvas[33, 32]) == (0, 0, 255)  # dots in the published colours
    big = np.asarray(draw_kps((640, 640), [[x * 10, y * 10] for x, y in KPS]))
    assert tuple(big[0, 0]) == (0, 0, 0) and tuple(big[275, 260]) == (153, 0, 0)  # a limb, at 60%, eye to nose


def test_adapter_files_load_weights_only_and_convert_to_safetensors(tmp_path):
    unet = tiny_controlnet_xl().unet
    adapter = synthetic_face_adapter(unet, seed=3, hidden=64, heads=1, dim_head=64)
    torch.save(adapter, tmp_path / "ip-adapter.bin")
    converted = convert(tmp_path / "ip-adapter.bin", tmp_path / "ip-adapter.safetensors")
    back = read_face_adapter(converted)
    for part in adapter:
        assert back[part].keys() == adapter[part].keys()
        assert all(torch.equal(back[part][k], v) for k, v in adapter[part].items())

    # anything but tensors and plain containers is refused, never unpickled
    torch.save({"image_proj": {"x": Fraction(1, 3)}, "ip_adapter": {}}, tmp_path / "evil.bin")
    with pytest.raises(Exception, match="weights-only"):
        read_face_adapter(tmp_path / "evil.bin")


def test_bad_face_files_are_one_line_each(tmp_path):
    np.save(tmp_path / "short.npy", np.zeros(128, np.float32))
    (tmp_path / "kps.json").write_text(json.dumps({"kps": KPS[:4]}))
    np.save(tmp_path / "ok.npy", np.zeros(512, np.float32))
    with pytest.raises(FaceError, match=r"512 finite numbers .* got shape \(128,\)"):
        load_face(str(tmp_path / "short.npy"), str(tmp_path / "kps.json"))
    with pytest.raises(FaceError, match="five \\[x, y\\] pairs"):
        load_face(str(tmp_path / "ok.npy"), str(tmp_path / "kps.json"))


@pytest.mark.parametrize("overrides, message", [
    ([], "face.embedding: InstantID needs a face"),
    (["face.embedding={dir}/short.npy", "face.kps={dir}/kps.json"], "512 finite numbers"),
    (["face.embedding={dir}/missing.npy", "face.kps={dir}/kps.json"], "missing.npy' does not exist"),
    (["face.image={dir}/photo.png", "face.models_dir={dir}"], "insightface is not installed"),
])
def test_bad_face_inputs_exit_non_zero_with_one_line(tmp_path, overrides, message):
    np.save(tmp_path / "short.npy", np.zeros((1, 128), np.float32))
    (tmp_path / "kps.json").write_text(json.dumps({"kps": KPS}))
    Image.new("RGB", (32, 32)).save(tmp_path / "photo.png")
    proc = run_cli("run", "model=tiny_instantid", *[o.format(dir=tmp_path) for o in overrides], cwd=tmp_path)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not job_dirs(tmp_path)  # failed before anything was written


def test_bench_scenario_measures_the_identitynet_skip(compose_run, face_files):
    """The ``instantid`` bench rows on the tiny model (no compiling): runs per image and fidelity columns."""
    from onediffx.bench.instantid import run_instantid_bench
    from onediffx.commands.bench import _fresh

    folder, _ = face_files
    cfg = compose_run("model=tiny_instantid", "model.synthetic=false", "compile=none", f"face.embedding={folder}/face.npy",
                      f"face.kps={folder}/kps.json", "steps=2", config_name="bench")
    rows = run_instantid_bench(_fresh(cfg), cfg, intervals=[2], repeat=1)
    assert [(r["interval"], r["identitynet"], r["identitynet_runs"]) for r in rows] == [
        (None, "every step", 2), (None, "every step", 2), (2, "full steps only", 1), (2, "every step", 2)]
    assert rows[1]["psnr_vs_eager_db"] == float("inf")  # compile=none: the same computation
    assert all(r["psnr_vs_compiled_db"] > 20 for r in rows[2:]) and rows[0]["speedup"] == 1


@pytest.mark.slow
def test_compiled_matches_eager_and_a_restart_compiles_nothing(face_files, tmp_path):
    """One Inductor compile (UNet with the IP processors, IdentityNet); a fresh CLI process then loads it."""
    from onediffx.compile import compile_options, compile_pipe, compile_state, save_pipe

    folder, embedding = face_files
    p = tiny_instantid()
    p.set_progress_bar_config(disable=True)
    eager = _call(p, embedding, ip_scale=0.8)  # the CLI's defaults: face.ip_adapter_scale=0.8, conditioning 0.8
    compile_pipe(p, "inductor", compile_options("inductor", components=["unet", "controlnet"]))
    compiled = _call(p, embedding)
    assert set(compile_state(p).saveable) == {"unet", "controlnet"}  # both ahead of time: the hook was off
    assert np.abs(compiled - eager).max() < 2e-3
    save_pipe(p, str(tmp_path / "graphs"))

    proc = run_cli("run", "model=tiny_instantid", f"face.embedding={folder}/face.npy", f"face.kps={folder}/kps.json",
                   "compile=inductor", "compile.components=[unet,controlnet]", f"cache.dir={tmp_path / 'graphs'}",
                   f"steps={STEPS}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (job,) = job_dirs(tmp_path / "outputs")
    metrics = json.loads((job / "metrics.json").read_text())
    assert metrics["stages"]["load-graph"]["hit"] is True
    assert metrics["compile_counters"]["graphs_compiled"] == 0 and metrics["compile_counters"]["dynamo_graphs"] == 0
    image = np.asarray(Image.open(job / metrics["outputs"][0]), dtype=np.int16)
    assert np.abs(image - np.round(compiled[0] * 255)).max() <= 1
