"""Compilation and the graph cache on the tiny SD pipeline (Inductor on the CPU).

One module-scoped pipeline is compiled at two resolutions and saved; every test reuses it, so the
suite pays for Inductor twice, not once per test.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from conftest import REPO, job_dirs, run_cli
from onediffx.compile import compile_options, compile_pipe, compile_state, load_pipe, save_pipe
from onediffx.compile.pipe import component_key
from onediffx.graph_cache import GraphCache
from onediffx.hooks import COMPILED, get_hook
from onediffx.models.tiny import tiny_sd
from onediffx.state import REGIONS

pytestmark = pytest.mark.slow
PROMPT = "a photo of an astronaut riding a horse on the moon"  # the CLI's default, for comparisons
SIZES = (64, 96)


def _image(pipe, size: int, seed: int = 0) -> np.ndarray:
    out = pipe(prompt=[PROMPT], height=size, width=size, num_inference_steps=2, guidance_scale=7.5,
               generator=[torch.Generator().manual_seed(seed)], output_type="pil")
    return np.asarray(out.images[0], dtype=np.int16)


def _options():
    return compile_options("inductor", components=["unet"])


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    pipe = tiny_sd()
    pipe.set_progress_bar_config(disable=True)
    eager = {size: _image(pipe, size) for size in SIZES}
    compile_pipe(pipe, "inductor", _options())
    images = {size: _image(pipe, size) for size in SIZES}
    cache_dir = tmp_path_factory.mktemp("graphs")
    written = save_pipe(pipe, str(cache_dir))
    return dict(pipe=pipe, eager=eager, images=images, cache_dir=cache_dir, written=written)


def _unet(compiled):
    return compile_state(compiled["pipe"]).saveable["unet"]


def test_compiled_output_matches_eager(compiled):
    for size in SIZES:
        assert np.abs(compiled["images"][size] - compiled["eager"][size]).max() <= 2


def test_module_object_and_parameters_stay_the_pipelines(compiled):
    pipe = compiled["pipe"]
    assert type(pipe.unet).__name__ == "UNet2DConditionModel"
    hook = get_hook(pipe.unet, COMPILED)  # the graphs are the UNet's forward through its named hook
    assert pipe.unet.forward is hook and hook.compiled is _unet(compiled)


def test_warmed_resolutions_alternate_without_recompiling(compiled):
    graphs_before, compiles_before = counters["stats"]["unique_graphs"], _unet(compiled).compiles
    for size in (*SIZES, *SIZES):
        assert np.array_equal(_image(compiled["pipe"], size), compiled["images"][size])
    assert _unet(compiled).compiles == compiles_before == len(SIZES)
    assert counters["stats"]["unique_graphs"] == graphs_before


def test_new_weights_reach_the_graph_without_recompiling(compiled):
    pipe, unet = compiled["pipe"], compiled["pipe"].unet
    original = {k: v.clone() for k, v in unet.state_dict().items()}
    torch.manual_seed(1)
    other = type(unet).from_config(unet.config).state_dict()
    graphs_before, compiles_before = counters["stats"]["unique_graphs"], _unet(compiled).compiles
    try:
        unet.load_state_dict(other)
        changed = _image(pipe, 64)
        reference = tiny_sd()
        reference.set_progress_bar_config(disable=True)
        reference.unet.load_state_dict(other)
        assert not np.array_equal(changed, compiled["images"][64])
        assert np.abs(changed - _image(reference, 64)).max() <= 2
        assert _unet(compiled).compiles == compiles_before
        assert counters["stats"]["unique_graphs"] == graphs_before
    finally:
        unet.load_state_dict(original)


def test_dispatch_tells_apart_calls_that_saved_guards_no_longer_check(compiled, caplog):
    """Saved graphs keep no guards on the module or on non-tensor arguments: the dispatch key must.

    A call differing only in ``return_dict``, or made after the weights changed memory format, must
    not be served by the graph prepared for the pipeline's call (here it runs eager, as configured).
    """
    pipe, handle = compiled["pipe"], _unet(compiled)
    captured = {}
    hook = pipe.unet.register_forward_pre_hook(lambda m, a, k: captured.setdefault("call", (a, k)), with_kwargs=True)
    try:
        _image(pipe, 64)
    finally:
        hook.remove()
    args, kwargs = captured["call"]
    compiles, on_miss = handle.compiles, handle.on_miss
    handle.on_miss = "eager"
    try:
        with torch.no_grad(), caplog.at_level(logging.WARNING):
            prepared = pipe.unet(*args, **kwargs)[0]
            as_dataclass = pipe.unet(*args, **{**kwargs, "return_dict": True})
            pipe.unet.to(memory_format=torch.contiguous_format)
            other_layout = pipe.unet(*args, **kwargs)[0]
    finally:
        pipe.unet.to(memory_format=torch.channels_last)
        handle.on_miss = on_miss
    assert type(as_dataclass).__name__ == "UNet2DConditionOutput"
    assert torch.allclose(as_dataclass.sample, prepared, atol=1e-4)
    assert torch.allclose(other_layout, prepared, atol=1e-4)
    assert handle.compiles == compiles and "was not prepared; running eager" in caplog.text


def test_restart_loads_graphs_and_compiles_nothing(compiled, tmp_path):
    """A fresh process (the real CLI) hits the cache, compiles nothing, and gives the same image."""
    proc = run_cli("run", "compile=inductor", "compile.components=[unet]", f"cache.dir={compiled['cache_dir']}",
                   "steps=2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (job,) = job_dirs(tmp_path / "outputs")
    metrics = json.loads((job / "metrics.json").read_text())
    stages = metrics["stages"]
    assert stages["load-graph"]["hit"] is True and stages["load-graph"]["components"]["unet"]["graphs"] == 2
    unet = stages["load-graph"]["components"]["unet"]  # where the restart's seconds went, per component
    assert unet["read_s"] >= 0 and unet["load_s"] > 0 and unet["read_s"] + unet["load_s"] <= stages["load-graph"]["seconds"]
    assert stages["save-graph"]["saved"] is False
    assert stages["warmup"]["enabled"] is False  # warmup.on_cache_hit=skip: nothing left to compile
    assert metrics["compile_counters"]["graphs_compiled"] == 0 and metrics["compile_counters"]["dynamo_graphs"] == 0
    from PIL import Image

    image = np.asarray(Image.open(job / metrics["outputs"][0]), dtype=np.int16)
    assert np.abs(image - compiled["images"][64]).max() <= 1


def test_a_restart_can_still_warm_up_on_a_cache_hit(compiled, compose_run):
    """``warmup.on_cache_hit=run`` (the launches' choice) keeps the warm-up after a full hit; ``skip`` drops it."""
    from onediffx.resolver import assemble

    common = ["compile=inductor", "compile.components=[unet]", f"cache.dir={compiled['cache_dir']}", "steps=2",
              "height=64", "width=64"]
    for choice, runs in (("run", True), ("skip", False)):
        asm = assemble(compose_run(*common, f"warmup.on_cache_hit={choice}"))
        assert asm.report["load-graph"]["hit"] is True
        assert asm.report["warmup"]["enabled"] is runs
        assert compile_state(asm.pipe).saveable["unet"].compiles == 0


def test_corrupt_entry_is_reported_and_rebuilt(compiled, tmp_path, caplog):
    cache_dir = tmp_path / "graphs"
    shutil.copytree(compiled["cache_dir"], cache_dir)
    (graph,) = [p for p in cache_dir.rglob("graph-0.bin")]
    graph.write_bytes(graph.read_bytes()[: graph.stat().st_size // 2])
    fresh = tiny_sd()
    compile_pipe(fresh, "inductor", _options())
    with caplog.at_level(logging.WARNING, logger="onediffx.graph_cache"):
        found = load_pipe(fresh, str(cache_dir))
    assert found["unet"] == {"hit": False, "reason": "corrupt"}
    assert any("unusable" in r.message and "truncated or corrupt" in r.message for r in caplog.records)
    assert not graph.parent.exists()  # removed, so the next save rebuilds it
    save_pipe(compiled["pipe"], str(cache_dir))  # the next save rebuilds the entry whole
    again = tiny_sd()
    compile_pipe(again, "inductor", _options())
    assert load_pipe(again, str(cache_dir))["unet"]["hit"] is True


def test_mismatched_key_is_a_miss_that_names_the_difference(compiled, caplog):
    pipe = compiled["pipe"]
    key = component_key(pipe, "unet", compile_state(pipe))
    assert key["dtype"] == "float32" and key["torch"] == torch.__version__
    other = {**key, "dtype": "float16"}
    with caplog.at_level(logging.WARNING, logger="onediffx.graph_cache"):
        assert GraphCache(compiled["cache_dir"]).load("unet", other) is None
    assert any("dtype: 'float32' -> 'float16'" in r.message for r in caplog.records)
    manifest = json.loads(next(compiled["cache_dir"].rglob("manifest.json")).read_text())
    assert manifest["key"]["device"] and manifest["key"]["compile"]["backend"] == "inductor"
    assert [g["signature"][0][0][0] for g in manifest["graphs"]] == [[2, 4, 32, 32], [2, 4, 48, 48]]  # the tiny VAE downsamples by 2


def test_concurrent_saves_leave_one_valid_entry(compiled, tmp_path):
    blobs = _unet(compiled).serialize()
    for i, blob in enumerate(blobs):
        (tmp_path / f"blob{i}").write_bytes(blob)
    script = textwrap.dedent(f"""
        import json, sys
        from pathlib import Path
        from onediffx.graph_cache import GraphCache
        src = Path({str(tmp_path)!r})
        blobs = [(src / f"blob{{i}}").read_bytes() for i in range({len(blobs)})]
        for _ in range(5):
            GraphCache(src / "cache").save("unet", {{"k": 1}}, blobs, [[i] for i in range(len(blobs))])
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script], cwd=REPO) for _ in range(2)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    entries = [p for p in (tmp_path / "cache" / "unet").iterdir() if p.is_dir()]
    assert len(entries) == 1 and not entries[0].name.startswith(".")
    loaded = GraphCache(tmp_path / "cache").load("unet", {"k": 1})
    assert loaded is not None and loaded.blobs == blobs


def test_processes_that_compiled_other_shapes_fill_one_entry_together(compiled, tmp_path):
    """Two processes save the same key at once, each with the one shape it compiled (a parallel fill):
    the entry ends with both, and a fresh pipeline runs both sizes from it without compiling."""
    unet = _unet(compiled)
    for i, blob in enumerate(unet.serialize()):
        (tmp_path / f"blob{i}").write_bytes(blob)
    key = component_key(compiled["pipe"], "unet", compile_state(compiled["pipe"]))
    (tmp_path / "key.json").write_text(json.dumps(key))
    script = textwrap.dedent(f"""
        import json, sys
        from pathlib import Path
        from onediffx.graph_cache import GraphCache
        src, i = Path({str(tmp_path)!r}), int(sys.argv[1])
        key, signature = json.loads((src / "key.json").read_text()), json.loads(sys.argv[2])
        for _ in range(5):
            GraphCache(src / "cache").save("unet", key, [(src / f"blob{{i}}").read_bytes()], [signature])
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(i), json.dumps(signature)], cwd=REPO)
             for i, signature in enumerate(unet.signatures)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    fresh = tiny_sd()
    fresh.set_progress_bar_config(disable=True)
    compile_pipe(fresh, "inductor", _options())
    found = load_pipe(fresh, str(tmp_path / "cache"))
    assert found["unet"]["hit"] is True and found["unet"]["graphs"] == len(SIZES)
    for size in SIZES:
        assert np.array_equal(_image(fresh, size), compiled["images"][size])
    assert compile_state(fresh).saveable["unet"].compiles == 0


def test_unknown_backend_and_missing_onediff_are_one_line(compose_run):
    from onediffx.errors import ConfigError, NotAvailableError
    from onediffx.resolver import plan

    with pytest.raises(ConfigError, match=r"compile.backend: unknown compile backend 'fast'"):
        plan(compose_run("compile.backend=fast"))
    with pytest.raises(NotAvailableError, match=r"compile.backend=oneflow: .* use compile=inductor"):
        plan(compose_run("plugins=[onediff]", "compile=inductor", "compile.backend=oneflow"))


def test_regions_share_one_graph_per_block_shape(compiled):
    """``compile=regional``: blocks compiled one by one, each shape once, the output still eager's."""
    torch._dynamo.reset()
    counters.clear()
    pipe = tiny_sd()
    pipe.set_progress_bar_config(disable=True)
    compile_pipe(pipe, "inductor", compile_options("regional", components=["unet"]))
    blocks = [m for m in pipe.unet.modules() if type(m).__name__ in ("BasicTransformerBlock", "ResnetBlock2D")]
    assert REGIONS.get(pipe.unet) == len(blocks) and compile_state(pipe).dynamo == ["unet"]
    image = _image(pipe, 64)
    graphs = counters["stats"]["unique_graphs"]
    assert 0 < graphs < len(blocks)  # blocks of one shape share a graph
    assert np.abs(image - compiled["eager"][64]).max() <= 2
    _image(pipe, 64)
    assert counters["stats"]["unique_graphs"] == graphs
    torch._dynamo.reset()


def test_a_region_name_that_matches_nothing_is_one_line(tmp_path):
    proc = run_cli("run", "model=tiny", "compile=regional", "compile.regions=[ResnetBlock2d]", "steps=1",
                   cwd=tmp_path, timeout=300)
    assert proc.returncode != 0
    assert "compile.regions: no ResnetBlock2d in unet" in proc.stderr and "ResnetBlock2D" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_ahead_of_time_regions_restart_without_tracing(compiled, tmp_path):
    """``compile=regional_aot``: one saved graph set per block structure, loaded by a restart."""
    from PIL import Image

    common = ["run", "compile=regional_aot", "compile.components=[unet]",
              f"cache.dir={tmp_path / 'graphs'}", "steps=2"]
    images, metrics = [], []
    for run in ("cold", "restart"):
        proc = run_cli(*common, f"hydra.run.dir={run}", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        metrics.append(json.loads((tmp_path / run / "metrics.json").read_text()))
        images.append(np.asarray(Image.open(tmp_path / run / metrics[-1]["outputs"][0]), dtype=np.int16))
    cold, restart = metrics
    blocks = [p for p in cold["stages"]["load-graph"]["components"]]
    assert all(p.startswith("unet.") for p in blocks) and 1 < len(blocks) < 18  # 18 blocks share fewer graph sets
    assert cold["compile_counters"]["graphs_compiled"] == len(blocks)
    assert restart["stages"]["load-graph"]["hit"] is True
    assert restart["compile_counters"]["graphs_compiled"] == 0 and restart["compile_counters"]["dynamo_graphs"] == 0
    assert np.abs(images[1] - images[0]).max() <= 1
    assert np.abs(images[0] - compiled["eager"][64]).max() <= 2


def test_a_start_cut_short_keeps_the_shapes_it_finished(tmp_path):
    """Each call that compiles saves: a start killed while compiling its second warm-up shape leaves
    the first in the cache, and the next start at that shape loads it and compiles nothing."""
    import os
    import signal
    import time

    cache = tmp_path / "graphs"
    common = ["compile=inductor", "compile.components=[unet]", f"cache.dir={cache}", "steps=2", "height=64", "width=64"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    env.pop("HYDRA_FULL_ERROR", None)
    shapes = "warmup.shapes=[{height:64,width:64,batch:1},{height:56,width:72,batch:1}]"
    first = subprocess.Popen([sys.executable, "-m", "onediffx", "run", *common, shapes], cwd=tmp_path, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not list(cache.rglob("manifest.json")) and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert first.poll() is None, f"the first start ended before any save: {first.stderr.read()[-2000:]}"
        os.killpg(first.pid, signal.SIGKILL)  # while the second shape compiles
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert first.returncode == -signal.SIGKILL
    (tmp_path / "again").mkdir()
    again = run_cli("run", *common, cwd=tmp_path / "again")
    assert again.returncode == 0, again.stderr[-2000:]
    (job,) = job_dirs(tmp_path / "again" / "outputs")
    metrics = json.loads((job / "metrics.json").read_text())
    load = metrics["stages"]["load-graph"]
    assert load["hit"] is True and load["components"]["unet"]["graphs"] == 1, load
    assert metrics["compile_counters"]["graphs_compiled"] == 0


def test_a_compile_gives_back_what_dynamos_guard_scope_kept():
    """Dynamo evaluates guarded sources in one process-wide scope and, when an evaluation raises,
    leaves the base object there (on an H200 that kept an up block of every released compiled UNet).
    Oracle: Dynamo's own ``AttrSource`` evaluation, unpatched and patched."""
    import gc
    import weakref

    from torch._dynamo.guards import _get_closure_vars
    from torch._dynamo.source import AttrSource, LocalSource
    from torch._guards import ChainedSource

    from onediffx.compile.dispatch import CompiledForward

    def failed_evaluation(get_value) -> weakref.ref:
        block = torch.nn.Linear(2, 2)
        try:  # as Dynamo does: the error is caught, the traceback dropped
            get_value(AttrSource(LocalSource("self"), "missing"), {"L": {"self": block}}, _get_closure_vars(), {})
        except AttributeError:
            pass
        return weakref.ref(block)

    unpatched = getattr(ChainedSource.get_value, "__wrapped__", ChainedSource.get_value)
    kept = failed_evaluation(unpatched)
    gc.collect()
    assert kept() is not None  # the torch bug: if this fails, torch fixed it and guard_scope.py can go
    module = torch.nn.Linear(2, 2)
    forward = CompiledForward(module, {"backend": "inductor", "dynamic": False, "options": {}})
    torch.testing.assert_close(forward(torch.ones(1, 2)), module(torch.ones(1, 2)))
    gc.collect()
    assert kept() is None  # dropped before the compile could copy it into its guards

    kept = failed_evaluation(ChainedSource.get_value)  # installed by that compile
    gc.collect()
    assert kept() is None and not [k for k in _get_closure_vars() if k.startswith("tmp")]
