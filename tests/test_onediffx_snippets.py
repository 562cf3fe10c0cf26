"""The OneDiffX document's snippets, run with the same calls and arguments on the built-in tiny models.

One test per snippet of ``seed/000_db2db00b592df3cc.txt`` (compile, save, load in a new process,
DeepCache for SDXL / SD 1.5 / SVD, the LoRA API, compiled graph re-use). What differs from the
document, and only that:

- hub ids: a tiny model written by ``save_pretrained(variant="fp16")`` into a temporary folder, so
  ``from_pretrained(..., variant="fp16", use_safetensors=True)`` runs as written;
- ``torch_dtype=torch.float32`` and ``pipe.to("cpu")``: half precision on a CPU is slow and its
  rounding would hide the comparisons below; the calls are the same;
- 512 px / 30 steps become 64 px / 2 steps; the SD and SDXL DeepCache snippets pass no size or
  step count, so they run at the tiny models' defaults (16 px, 50 steps). SVD's call defaults to
  576x1024 and 25 steps whatever the model (the snippet resizes its input to that), so that call
  gains ``height=32, width=64, num_inference_steps=4``; frames stay the default (the tiny UNet's 2);
- ``torch.manual_seed(0)`` before each generating call, so images can be compared across runs
  and processes; the SVD input image is a local file instead of a URL.

Every test checks numbers against an oracle: eager diffusers for compiled output, the saving
process for the loading one, the ``DeepCache`` package's helper for SD/SDXL DeepCache (onediffx's
eager DeepCache for SVD, which the helper does not cover), diffusers' ``load_lora_weights`` +
``fuse_lora`` / ``set_adapters`` for LoRA. The document's LoRA section lists functions rather
than a snippet: its tests make the documented calls on the compiled SDXL pipeline. Its graph re-use
pseudo code names ``oneflow_compile`` and ``_torch_module``; here the compiled UNet is the
pipeline's own module, and the pipeline is SDXL, as in the example that section points to. One compiled pipeline per model
family is shared (module-scoped fixtures), so the file pays for Inductor once per family.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from onediffx.compile import IgnoredCompileOptionWarning, compile_state
from onediffx.compile.pipe import compile_counters
from onediffx.lora.synthetic import lora_targets, random_lora, save_kohya
from onediffx.models.tiny import tiny_sd, tiny_sdxl, tiny_svd

pytestmark = pytest.mark.slow

SDXL_PROMPT = "street style, detailed, raw photo, woman, face, shot on CineStill 800T"
ONEFLOW_ONLY = "attention_allow_half_precision_score_accumulation_max_m"


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def max_diff(a, b) -> int:
    """Largest per-pixel difference (0..255) between two images or two lists of frames."""
    a, b = (np.stack([pixels(x) for x in v]) if isinstance(v, list) else pixels(v) for v in (a, b))
    assert a.shape == b.shape
    return int(np.abs(a - b).max())


def weights(pipe) -> dict:
    return {(c, n): p.detach().clone() for c in ("unet", "text_encoder", "text_encoder_2")
            for n, p in getattr(pipe, c).named_parameters()}


def graphs(pipe) -> tuple[int, int]:
    """(ahead-of-time graphs compiled, Dynamo graphs traced) so far: both must stay put on re-use."""
    found = compile_counters(pipe)
    return found["graphs_compiled"], found["dynamo_graphs"]


@pytest.fixture(scope="module", autouse=True)
def fresh_dynamo():
    """Start and leave Dynamo empty: other modules' graphs neither help nor count here."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory) -> str:
    """Stands in for ``stabilityai/stable-diffusion-xl-base-1.0``."""
    folder = tmp_path_factory.mktemp("sdxl")
    tiny_sdxl().save_pretrained(folder, variant="fp16", safe_serialization=True)
    return str(folder)


def sdxl_image(pipe):
    """The compile/save/load snippets' call, at 64 px and 2 steps."""
    torch.manual_seed(0)
    return pipe(
        prompt=SDXL_PROMPT,
        height=64,
        width=64,
        num_inference_steps=2,
        output_type="pil",
    ).images


def load_sdxl(sdxl_dir: str):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(
        sdxl_dir, torch_dtype=torch.float32, variant="fp16", use_safetensors=True
    )
    pipe.to("cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


# -- compile, save, load ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compiled_sdxl(sdxl_dir, tmp_path_factory):
    """The ``compile_pipe`` snippet, with the eager image of the same pipeline taken first (the oracle)."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    from onediffx import compile_pipe

    pipe = StableDiffusionXLPipeline.from_pretrained(
        sdxl_dir,
        torch_dtype=torch.float32,
        variant="fp16",
        use_safetensors=True
    )
    pipe.to("cpu")
    pipe.set_progress_bar_config(disable=True)
    eager = sdxl_image(pipe)

    pipe = compile_pipe(pipe)

    # run once to trigger compilation
    image = sdxl_image(pipe)

    workdir = tmp_path_factory.mktemp("compiled_sdxl")
    image[0].save(workdir / "test_image.png")
    return SimpleNamespace(pipe=pipe, eager=eager, image=image, workdir=workdir, counters=graphs(pipe))


@pytest.fixture(scope="module")
def saved_sdxl(compiled_sdxl):
    """The ``save_pipe`` snippet's last line, on the compiled pipeline."""
    from onediffx import save_pipe

    cached_pipe = compiled_sdxl.workdir / "cached_pipe"
    written = save_pipe(compiled_sdxl.pipe, dir=str(cached_pipe))
    return SimpleNamespace(dir=cached_pipe, written=written)


def test_compile_pipe(compiled_sdxl):
    """Compiled output is eager's; UNet and VAE decoder are compiled in place, once each."""
    pipe = compiled_sdxl.pipe
    assert max_diff(compiled_sdxl.image[0], compiled_sdxl.eager[0]) <= 2
    assert sorted(compile_state(pipe).saveable) == ["unet", "vae.decoder"]
    assert type(pipe.unet).__name__ == "UNet2DConditionModel"  # the pipeline's own module, compiled
    assert compiled_sdxl.counters[0] == 2
    again = sdxl_image(pipe)
    assert max_diff(again[0], compiled_sdxl.image[0]) == 0 and graphs(pipe) == compiled_sdxl.counters
    assert (compiled_sdxl.workdir / "test_image.png").is_file()


def test_save_pipe(saved_sdxl):
    """One graph per compiled component lands in the folder, each in a manifest-keyed entry."""
    assert {path: entry["graphs"] for path, entry in saved_sdxl.written.items()} == {"unet": 1, "vae.decoder": 1}
    for entry in saved_sdxl.written.values():
        manifest = json.loads((Path(entry["path"]) / "manifest.json").read_text())
        assert manifest["key"]["compile"]["backend"] == "inductor"


LOAD_SNIPPET = '''
import json
import torch
from diffusers import StableDiffusionXLPipeline
from onediffx import compile_pipe, load_pipe
from onediffx.compile.pipe import compile_counters

pipe = StableDiffusionXLPipeline.from_pretrained(
    {model!r},
    torch_dtype=torch.float32,
    variant="fp16",
    use_safetensors=True
)
pipe.to("cpu")

pipe = compile_pipe(pipe)

# load the compiled pipe
found = load_pipe(pipe, dir={cached!r})

# no compilation now
torch.manual_seed(0)
image = pipe(
    prompt={prompt!r},
    height=64,
    width=64,
    num_inference_steps=2,
    output_type="pil",
).images

image[0].save(f"test_image.png")
print(json.dumps({{"found": {{k: v["hit"] for k, v in found.items()}}, "counters": compile_counters(pipe)}}))
'''


def test_load_pipe_in_a_new_process(saved_sdxl, compiled_sdxl, sdxl_dir, tmp_path):
    """A new process loads every graph, compiles and traces nothing, and draws the saving process's image."""
    from PIL import Image

    script = tmp_path / "load.py"
    script.write_text(LOAD_SNIPPET.format(model=sdxl_dir, cached=str(saved_sdxl.dir), prompt=SDXL_PROMPT))
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["found"] == {"unet": True, "vae.decoder": True}
    assert report["counters"]["graphs_compiled"] == 0 and report["counters"]["graphs_loaded"] == 2
    assert report["counters"]["dynamo_graphs"] == 0
    assert max_diff(Image.open(tmp_path / "test_image.png"), compiled_sdxl.image[0]) <= 1


# -- DeepCache ----------------------------------------------------------------------------------------


DEEP_CACHE = dict(cache_interval=3, cache_layer_id=0, cache_block_id=0)


def helper_image(pipe_class, folder: str, prompt: str):
    """The oracle: the ``DeepCache`` package's helper on a plain diffusers pipeline, same arguments."""
    from DeepCache import DeepCacheSDHelper

    from onediffx.deep_cache import helper_branch_id

    pipe = pipe_class.from_pretrained(folder, torch_dtype=torch.float32, variant="fp16", use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    helper = DeepCacheSDHelper(pipe)
    helper.set_params(cache_interval=DEEP_CACHE["cache_interval"],
                      cache_branch_id=helper_branch_id(pipe.unet, DEEP_CACHE["cache_layer_id"],
                                                       DEEP_CACHE["cache_block_id"]))
    helper.enable()
    try:
        torch.manual_seed(0)
        return pipe(prompt, output_type="pil").images[0]
    finally:
        helper.disable()


def deep_cache_image(pipe, prompt: str):
    """The DeepCache snippets' call."""
    torch.manual_seed(0)
    return pipe(
        prompt,
        cache_interval=3, cache_layer_id=0, cache_block_id=0,
        output_type='pil'
    ).images[0]


def check_deep_cache(pipe, eager, helper, compiled, warm) -> None:
    assert max_diff(eager, helper) <= 1  # onediffx's eager DeepCache is the helper's computation
    assert max_diff(compiled, eager) <= 2
    assert compile_state(pipe).dynamo == ["unet"]  # DeepCache's hooks: Dynamo traces the two passes
    assert graphs(pipe) == warm, "the call after warm-up compiled again"


def test_deep_cache_sdxl(sdxl_dir):
    import torch

    from onediffx import compile_pipe
    from onediffx.deep_cache import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(
        sdxl_dir,
        torch_dtype=torch.float32,
        variant="fp16",
        use_safetensors=True
    )
    pipe.to("cpu")
    pipe.set_progress_bar_config(disable=True)

    prompt = "A photo of a cat. Focus light and create sharp, defined edges."
    eager = deep_cache_image(pipe, prompt)

    pipe = compile_pipe(pipe)

    # Warmup
    for i in range(1):
        torch.manual_seed(0)
        deepcache_output = pipe(
            prompt,
            cache_interval=3, cache_layer_id=0, cache_block_id=0,
            output_type='pil'
        ).images[0]
    warm = graphs(pipe)

    torch.manual_seed(0)
    deepcache_output = pipe(
        prompt,
        cache_interval=3, cache_layer_id=0, cache_block_id=0,
        output_type='pil'
    ).images[0]

    import diffusers

    check_deep_cache(pipe, eager, helper_image(diffusers.StableDiffusionXLPipeline, sdxl_dir, prompt),
                     deepcache_output, warm)


def test_deep_cache_sd15(tmp_path):
    import torch

    from onediffx import compile_pipe
    from onediffx.deep_cache import StableDiffusionPipeline

    model = tmp_path / "sd15"  # stands in for runwayml/stable-diffusion-v1-5
    tiny_sd().save_pretrained(model, variant="fp16", safe_serialization=True)

    pipe = StableDiffusionPipeline.from_pretrained(
        str(model),
        torch_dtype=torch.float32,
        variant="fp16",
        use_safetensors=True
    )
    pipe.to("cpu")
    pipe.set_progress_bar_config(disable=True)

    prompt = "a photo of an astronaut on a moon"
    eager = deep_cache_image(pipe, prompt)

    pipe = compile_pipe(pipe)

    # Warmup
    for i in range(1):
        torch.manual_seed(0)
        deepcache_output = pipe(
            prompt,
            cache_interval=3, cache_layer_id=0, cache_block_id=0,
            output_type='pil'
        ).images[0]
    warm = graphs(pipe)

    torch.manual_seed(0)
    deepcache_output = pipe(
        prompt,
        cache_interval=3, cache_layer_id=0, cache_block_id=0,
        output_type='pil'
    ).images[0]

    import diffusers

    check_deep_cache(pipe, eager, helper_image(diffusers.StableDiffusionPipeline, str(model), prompt),
                     deepcache_output, warm)


@pytest.fixture
def global_compile_options():
    """The SVD snippet assigns to the process-wide ``compile_options``: leave it as found."""
    from onediffx import compile_options

    compile_options.reset()
    yield compile_options
    compile_options.reset()


def has_ffmpeg() -> bool:
    try:
        import imageio_ffmpeg  # noqa: F401
    except ImportError:
        return False
    return True


def svd_frames(pipe, input_image):
    """The SVD snippet's call, at the test's size and steps."""
    torch.manual_seed(0)
    return pipe(
        input_image,
        height=32, width=64, num_inference_steps=4,
        decode_chunk_size=5,
        cache_interval=3, cache_branch=0,
    ).frames[0]


def test_deep_cache_svd(tmp_path, global_compile_options, recwarn):
    """``compile_options`` as OneDiffX's options object: the oneflow-only knob is named once and
    ignored, and the compiled DeepCache video is eager DeepCache's."""
    import torch
    from PIL import Image

    from diffusers.utils import load_image, export_to_video
    from onediffx import compile_pipe, compile_options
    from onediffx.deep_cache import StableVideoDiffusionPipeline

    model = tmp_path / "svd"  # stands in for stabilityai/stable-video-diffusion-img2vid-xt
    tiny_svd().save_pretrained(model, variant="fp16", safe_serialization=True)
    rocket = tmp_path / "rocket.png"  # stands in for the URL
    Image.fromarray((np.random.RandomState(0).rand(72, 128, 3) * 255).astype("uint8")).save(rocket)

    pipe = StableVideoDiffusionPipeline.from_pretrained(
        str(model),
        torch_dtype=torch.float32,
        variant="fp16",
        use_safetensors=True
    )
    pipe.to("cpu")
    pipe.set_progress_bar_config(disable=True)

    compile_options.attention_allow_half_precision_score_accumulation_max_m = 0
    pipe = compile_pipe(pipe, options=compile_options)

    ignored = [w for w in recwarn if issubclass(w.category, IgnoredCompileOptionWarning)]
    assert len(ignored) == 1 and ONEFLOW_ONLY in str(ignored[0].message)
    assert ignored[0].filename == __file__  # points at the snippet's line

    input_image = load_image(str(rocket))
    input_image = input_image.resize((64, 32))

    # Warmup
    for i in range(1):
        torch.manual_seed(0)
        deepcache_output = pipe(
            input_image,
            height=32, width=64, num_inference_steps=4,
            decode_chunk_size=5,
            cache_interval=3, cache_branch=0,
        ).frames[0]
    warm = graphs(pipe)

    torch.manual_seed(0)
    deepcache_output = pipe(
        input_image,
        height=32, width=64, num_inference_steps=4,
        decode_chunk_size=5,
        cache_interval=3, cache_branch=0,
    ).frames[0]

    if has_ffmpeg():  # imageio's ffmpeg backend is an optional package
        export_to_video(deepcache_output, str(tmp_path / "generated.mp4"), fps=7)
        assert (tmp_path / "generated.mp4").stat().st_size > 0

    assert len(deepcache_output) == pipe.unet.config.num_frames
    assert compile_state(pipe).dynamo == ["unet"] and graphs(pipe) == warm
    eager = StableVideoDiffusionPipeline.from_pretrained(str(model), use_safetensors=True, variant="fp16")
    eager.set_progress_bar_config(disable=True)
    assert max_diff(deepcache_output, svd_frames(eager, input_image)) <= 2


# -- the LoRA API, on the compiled SDXL pipeline --------------------------------------------------------


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory) -> dict[str, Path]:
    """Two kohya LoRAs (SGM block names, text encoders and LoCon convs included), as real files."""
    folder = tmp_path_factory.mktemp("loras")
    reference = tiny_sdxl()
    targets = lora_targets(reference)
    blocks = reference.unet.config.layers_per_block
    return {name: save_kohya(random_lora(targets, 4, seed=seed), folder / f"{name}.safetensors",
                             sgm_layers_per_block=blocks)
            for name, seed in (("emoji", 1), ("metal", 2))}


def diffusers_reference(sdxl_dir: str, files: dict[str, Path], scales: dict[str, float]):
    """The oracle: diffusers (PEFT backend) loads and fuses the same LoRAs, then drops its LoRA layers.

    One LoRA: ``load_lora_weights`` + ``fuse_lora(lora_scale=...)``; several: ``set_adapters`` first.
    """
    pipe = load_sdxl(sdxl_dir)
    for name in scales:
        pipe.load_lora_weights(str(files[name]), adapter_name=name)
    if len(scales) == 1:
        pipe.fuse_lora(lora_scale=next(iter(scales.values())))
    else:
        pipe.set_adapters(list(scales), list(scales.values()))
        pipe.fuse_lora()
    pipe.unload_lora_weights()
    return pipe


def assert_weights_match(compiled, reference) -> None:
    """Every parameter diffusers has (the compiled UNet also holds fused q/k/v copies) matches."""
    got, expected = weights(compiled), weights(reference)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=5e-6, msg=str(key))


def test_lora_load_and_fuse_then_unfuse(compiled_sdxl, lora_files, sdxl_dir):
    """``load_and_fuse_lora`` on the compiled pipeline is diffusers' fuse, with no recompiling;
    ``unfuse_lora`` restores every weight bit-exactly."""
    import onediffx.lora as lora

    pipe, before, counted = compiled_sdxl.pipe, weights(compiled_sdxl.pipe), graphs(compiled_sdxl.pipe)
    try:
        lora.load_and_fuse_lora(pipe, str(lora_files["emoji"]), adapter_name="emoji", lora_scale=0.7)
        image = sdxl_image(pipe)
        reference = diffusers_reference(sdxl_dir, lora_files, {"emoji": 0.7})
        assert_weights_match(pipe, reference)
        assert max_diff(image[0], sdxl_image(reference)[0]) <= 2
        assert max_diff(image[0], compiled_sdxl.image[0]) > 2  # the LoRA changed the image
        assert graphs(pipe) == counted

        lora.unfuse_lora(pipe)
        assert all(torch.equal(value, before[key]) for key, value in weights(pipe).items())
        assert max_diff(sdxl_image(pipe)[0], compiled_sdxl.image[0]) == 0
    finally:
        lora.delete_adapters(pipe)
    assert all(torch.equal(value, before[key]) for key, value in weights(pipe).items())


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")  # diffusers' oracle loading two adapters
def test_lora_adapters_set_fuse_and_delete(compiled_sdxl, lora_files, sdxl_dir):
    """Load two without fusing, ``set_and_fuse_adapters`` both (diffusers' ``set_adapters`` +
    ``fuse_lora``), ``delete_adapters`` one (exactly the other stays), then all (the base is back)."""
    import onediffx.lora as lora

    pipe, before, counted = compiled_sdxl.pipe, weights(compiled_sdxl.pipe), graphs(compiled_sdxl.pipe)
    try:
        for name in ("emoji", "metal"):
            lora.load_lora_and_optionally_fuse(pipe, str(lora_files[name]), adapter_name=name, fuse=False,
                                               offload_device="cpu")
        assert all(torch.equal(value, before[key]) for key, value in weights(pipe).items())  # loaded, not fused

        lora.set_and_fuse_adapters(pipe, ["emoji", "metal"], [0.5, 1.0])
        lora.update_graph_with_constant_folding_info(pipe.unet)  # OneDiffX's call: nothing to do here
        both = diffusers_reference(sdxl_dir, lora_files, {"emoji": 0.5, "metal": 1.0})
        assert_weights_match(pipe, both)
        assert max_diff(sdxl_image(pipe)[0], sdxl_image(both)[0]) <= 2

        lora.delete_adapters(pipe, "emoji")
        assert_weights_match(pipe, diffusers_reference(sdxl_dir, lora_files, {"metal": 1.0}))
        assert graphs(pipe) == counted
    finally:
        lora.delete_adapters(pipe)
    assert all(torch.equal(value, before[key]) for key, value in weights(pipe).items())


# -- compiled graph re-using --------------------------------------------------------------------------


def test_compiled_graph_reuse(compiled_sdxl, sdxl_dir):
    """A same-architecture model's weights loaded into the compiled UNet: no compiling, the new
    model's eager image.

    OneDiffX loaded into ``compiled_unet._torch_module``; onediffx compiles the pipeline's own module
    in place, so ``base.unet`` is both the compiled UNet and the module to load into.
    """
    from diffusers import StableDiffusionXLPipeline

    base = compiled_sdxl.pipe  # compiled, and run once at this shape (the fixture)
    original = {k: v.clone() for k, v in base.unet.state_dict().items()}
    counted = graphs(base)

    new_base = StableDiffusionXLPipeline(**load_sdxl(sdxl_dir).components)
    torch.manual_seed(1)
    new_base.unet = type(new_base.unet).from_config(new_base.unet.config)  # same architecture, other weights
    new_base.set_progress_bar_config(disable=True)
    expected = sdxl_image(new_base)  # eager, the oracle
    try:
        # Re-use the compiled graph by loading the new state dict into the compiled module
        base.unet.load_state_dict(new_base.unet.state_dict())
        new_base.unet = base.unet
        # no compiling: new_base.unet is already compiled
        image = sdxl_image(new_base)
        assert graphs(base) == counted
        assert compile_state(base).saveable["unet"].compiles == 1
        assert max_diff(image[0], expected[0]) <= 2
        assert max_diff(image[0], compiled_sdxl.image[0]) > 2
    finally:
        base.unet.load_state_dict(original)
    assert max_diff(sdxl_image(base)[0], compiled_sdxl.image[0]) == 0
