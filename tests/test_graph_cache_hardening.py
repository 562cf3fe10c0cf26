"""The graph cache against a hostile-user probe (issue 14): each test is the probe that found a defect.

Most tests work on ``GraphCache`` with small byte blobs (no compiling). One module-scoped
pipeline is compiled once (Inductor, tiny UNet, 64x64) for the tests that need real graphs: a
loaded graph that does not fit (reported as a miss, saved anew), and a restart with another
thread count and an empty Inductor cache folder (a real CLI process).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, run_cli
from onediffx.graph_cache import GraphCache, environment_key, key_hash
from onediffx.graph_cache.store import QUARANTINE

KEY = {"k": 1, "torch": "x"}
BLOBS = [b"graph zero" * 100, b"graph one" * 50]
SIGNATURES = [[[[2, 4, 32, 32], "float32"]], [[[2, 4, 48, 48], "float32"]]]
ROOT = os.geteuid() == 0
NOBODY = 65534


def _cache(root: Path, key_file: Path, **kw) -> GraphCache:
    return GraphCache(root, key_file=key_file, **kw)


@pytest.fixture
def key_file(tmp_path) -> Path:
    return tmp_path / "keys" / "graph-cache.key"


@pytest.fixture
def saved(tmp_path, key_file):
    """A valid entry with two graphs, signed with ``key_file``."""
    root = tmp_path / "graphs"
    entry = _cache(root, key_file).save("unet", KEY, BLOBS, SIGNATURES)
    assert entry is not None and (entry / "manifest.json").is_file()
    return root, entry


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


# -- the key ---------------------------------------------------------------------------------------


def test_thread_count_and_cpu_isa_are_in_the_key():
    """A graph saved with 2 threads fails Dynamo's global-state guard under 1 thread: another key."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = environment_key(torch.device("cpu"))
        torch.set_num_threads(1)
        one = environment_key(torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    assert two["process"]["num_threads"] == 2 and one["process"]["num_threads"] == 1
    assert key_hash(two) != key_hash(one)
    assert {k: v for k, v in two.items() if k != "process"} == {k: v for k, v in one.items() if k != "process"}
    assert two["cpu_isa"] == torch.backends.cpu.get_cpu_capability()
    # What the saved guard checks, read from the guard itself: nothing per-call (grad mode, autocast).
    assert "grad_mode" not in two["process"] and "autocast_state" not in two["process"]


def test_a_changed_thread_count_is_named_in_the_miss(tmp_path, key_file, caplog):
    root = tmp_path / "graphs"
    other = {**KEY, "process": {"num_threads": 1}}
    _cache(root, key_file).save("unet", {**KEY, "process": {"num_threads": 2}}, BLOBS, SIGNATURES)
    cache = _cache(root, key_file)
    with caplog.at_level(logging.WARNING, logger="onediffx.graph_cache"):
        assert cache.load("unet", other) is None
    assert cache.last_miss == "stale"
    assert any("process.num_threads: 2 -> 1" in m for m in _warnings(caplog))


# -- entries that broke every run ------------------------------------------------------------------


@pytest.mark.parametrize("manifest", [[1, 2, 3], "graphs-abc"], ids=["list", "graphs-is-a-string"])
def test_wrong_shape_manifest_is_a_quarantined_miss_and_the_next_run_works(saved, key_file, caplog, manifest):
    root, entry = saved
    if manifest == "graphs-abc":
        manifest = {**json.loads((entry / "manifest.json").read_text()), "graphs": "abc"}
    (entry / "manifest.json").write_text(json.dumps(manifest))
    # A neighbour with a wrong-shape manifest must not break the stale-key explanation either.
    neighbour = root / "unet" / ("0" * 20)
    neighbour.mkdir()
    (neighbour / "manifest.json").write_text("[1, 2, 3]")
    cache = _cache(root, key_file)
    with caplog.at_level(logging.WARNING, logger="onediffx.graph_cache"):
        assert cache.load("unet", KEY) is None
        assert cache.load("unet", {**KEY, "k": 2}) is None and cache.last_miss == "absent"
    assert cache.load("unet", KEY) is None and cache.last_miss == "absent"  # gone from its place
    (quarantined,) = (root / QUARANTINE).iterdir()
    assert quarantined.name.startswith(f"unet-{entry.name}-")
    assert json.loads((quarantined / "manifest.json").read_text()) == manifest  # the evidence is kept
    (message,) = [m for m in _warnings(caplog) if "unusable" in m]
    assert str(quarantined) in message and "\n" not in message
    assert _cache(root, key_file).save("unet", KEY, BLOBS, SIGNATURES) == entry  # the next run saves
    assert _cache(root, key_file).load("unet", KEY).blobs == BLOBS  # and the one after loads


def test_a_graph_file_larger_than_its_manifest_says_is_refused_before_reading(saved, key_file, caplog):
    root, entry = saved
    with open(entry / "graph-0.bin", "ab") as f:
        f.truncate(64 << 20)  # sparse: 64 MiB that the reader must not read to find out
    with caplog.at_level(logging.WARNING, logger="onediffx.graph_cache"):
        assert _cache(root, key_file).load("unet", KEY) is None
    assert any(f"graph-0.bin is {64 << 20} bytes, its manifest says {len(BLOBS[0])}" in m for m in _warnings(caplog))


def test_cache_root_that_is_a_file_is_one_warning_and_a_miss(tmp_path, key_file, caplog):
    root = tmp_path / "graphs"
    root.write_text("not a folder")
    cache = _cache(root, key_file)
    with caplog.at_level(logging.WARNING, logger="onediffx.graph_cache"):
        assert cache.load("unet", KEY) is None
        assert cache.save("unet", KEY, BLOBS, SIGNATURES) is None
    assert cache.last_miss == "unreadable"
    (message,) = _warnings(caplog)  # said once, for the load and the save
    assert f"cache.dir {root} is a file" in message and "point cache.dir at a folder" in message
    assert root.read_text() == "not a folder"


def test_lock_path_that_is_a_folder_is_one_warning_and_a_miss(saved, key_file, caplog):
    root, entry = saved
    lock = Path(f"{entry}.lock")
    lock.unlink(missing_ok=True)
    lock.mkdir()
    cache = _cache(root, key_file)
    with caplog.at_level(logging.WARNING, logger="onediffx.graph_cache"):
        assert cache.load("unet", KEY) is None
        assert cache.save("unet", KEY, BLOBS, SIGNATURES) is None
    assert cache.last_miss == "unreadable" and (entry / "manifest.json").is_file()  # nothing quarantined
    (message,) = _warnings(caplog)
    assert f"lock {lock} is a folder" in message and f"rmdir {lock}" in message


READ_ONLY_PROBE = textwrap.dedent("""
    import json, logging, sys
    from onediffx.graph_cache import GraphCache
    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logging.getLogger("onediffx.graph_cache").addHandler(handler)
    root, key_file = sys.argv[1], sys.argv[2]
    key, blobs, signatures = json.loads(sys.argv[3])
    cache = GraphCache(root, key_file=key_file)
    loaded = cache.load("unet", key)
    saved = cache.save("other", key, [b"x"], [[1]])
    saved_again = cache.save("other", key, [b"x"], [[1]])
    print(json.dumps({"blobs": [b.decode() for b in loaded.blobs] if loaded else None,
                      "saved": [str(saved), str(saved_again)], "warnings": records}))
""")


def _python_for_nobody() -> tuple[str, list[str]]:
    """An interpreter ``nobody`` may run, and the path to this tree and to ``filelock``
    (``onediffx.graph_cache`` needs nothing else; a venv under /root is closed to other users)."""
    import filelock

    site = str(Path(filelock.__file__).resolve().parent.parent)
    version = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    for python in (sys.executable, f"/usr/bin/{version}", f"/usr/local/bin/{version}"):
        if not python:
            continue
        try:
            ok = subprocess.run([python, "-c", "import filelock, onediffx.graph_cache"], user=NOBODY, cwd="/",
                                env={**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{site}"}, capture_output=True,
                                timeout=60).returncode == 0
        except PermissionError:
            ok = False
        if ok:
            return python, [str(REPO), site]
    pytest.skip("root ignores permission bits, and no Python here can be run as nobody with this tree")


def test_read_only_cache_loads_and_skips_saving_with_one_warning(tmp_path, key_file):
    """``chmod 0555``: no lock file can be made, yet the entry loads; saving is one warning.

    root ignores permission bits, so as root the probe runs as ``nobody``, with a copy of the key.
    """
    base = Path(tempfile.mkdtemp(prefix="onediffx-ro-"))  # pytest's tmp_path is closed to other users
    try:
        os.chmod(base, 0o755)
        root = base / "graphs"
        args = json.dumps([KEY, [b.decode() for b in BLOBS], SIGNATURES])
        key = base / "key"
        _cache(root, key).save("unet", KEY, BLOBS, SIGNATURES)
        for lock in root.rglob("*.lock"):
            lock.unlink()
        for path in (root, *root.rglob("*")):
            if path.is_dir():
                os.chmod(path, 0o555)
        python, path = sys.executable, [str(REPO)]
        if ROOT:
            os.chown(key, NOBODY, -1)
            python, path = _python_for_nobody()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(path), "HOME": str(base)}
        proc = subprocess.run([python, "-c", READ_ONLY_PROBE, str(root), str(key), args], env=env,
                              capture_output=True, text=True, timeout=120, user=NOBODY if ROOT else None, cwd=base)
        assert proc.returncode == 0, proc.stderr
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        assert result["blobs"] == [b.decode() for b in BLOBS]
        assert result["saved"] == ["None", "None"]
        (warning,) = result["warnings"]  # one, though saving was tried twice
        assert f"graph cache {root} is read-only" in warning and "not saved" in warning
        assert not list(root.rglob("*.lock")) and not (root / "other").exists()
    finally:
        for path in (base, *base.rglob("*")):
            if path.is_dir():
                os.chmod(path, 0o755)
        shutil.rmtree(base)


# -- trust -----------------------------------------------------------------------------------------


class Marker:
    """Unpickling this creates a file: the proof that a graph file was (not) unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def _forge(entry: Path, blob: bytes) -> None:
    """What a writer without the key can do: replace the graph and fix its size and sha256."""
    import hashlib

    manifest = json.loads((entry / "manifest.json").read_text())
    (entry / "graph-0.bin").write_bytes(blob)
    manifest["graphs"][0].update(bytes=len(blob), sha256=hashlib.sha256(blob).hexdigest())
    (entry / "manifest.json").write_text(json.dumps(manifest))


def test_a_forged_entry_is_refused_quarantined_and_never_unpickled(tmp_path, key_file, caplog):
    """Rewritten blob and sha256 (old signature kept), and an entry signed with another key:
    both refused before anything is unpickled, both moved to the quarantine."""
    from onediffx.compile import compile_options, compile_pipe, compile_state, load_pipe
    from onediffx.compile.pipe import component_key
    from onediffx.models.tiny import tiny_sd

    pipe = compile_pipe(tiny_sd(), "inductor", compile_options("inductor", components=["unet"]))  # compiles nothing yet
    key = component_key(pipe, "unet", compile_state(pipe))
    marker = tmp_path / "pwned"
    evil = pickle.dumps(Marker(str(marker)))
    root = tmp_path / "graphs"
    rewritten = _cache(root, key_file).save("unet", key, [b"a real graph"], [SIGNATURES[0]])
    _forge(rewritten, evil)
    for attempt in ("rewritten", "other key"):
        with caplog.at_level(logging.WARNING, logger="onediffx.graph_cache"):
            found = load_pipe(pipe, str(root), key_file=str(key_file))
        assert found["unet"] == {"hit": False, "reason": "corrupt"}
        assert not marker.exists() and not rewritten.exists()
        assert compile_state(pipe).saveable["unet"].entries == []
        _cache(root, tmp_path / "attacker.key").save("unet", key, [evil], [SIGNATURES[0]])  # the second attempt
    assert sum("signature does not match this user's key" in m for m in _warnings(caplog)) == 2
    quarantined = sorted((root / QUARANTINE).iterdir())
    assert len(quarantined) == 2 and all((q / "graph-0.bin").read_bytes() == evil for q in quarantined)
    pickle.loads(evil)  # the control: the same bytes, unpickled, do run code
    assert marker.exists()


def test_world_writable_cache_is_refused_unless_trusted(saved, key_file, caplog):
    root, entry = saved
    os.chmod(root, 0o777)
    cache = _cache(root, key_file)
    with caplog.at_level(logging.WARNING, logger="onediffx.graph_cache"):
        assert cache.load("unet", KEY) is None
        assert cache.save("unet", KEY, BLOBS, SIGNATURES) is None
    assert cache.last_miss == "untrusted" and entry.exists()  # refused, not quarantined: it may be fine
    (message,) = _warnings(caplog)
    assert f"{root} is writable by others" in message and "cache.trusted=true" in message and f"chmod go-w {root}" in message
    assert _cache(root, key_file, trusted=True).load("unet", KEY).blobs == BLOBS
    os.chmod(root, 0o755)
    os.chmod(entry, 0o775)  # an entry writable by its group
    assert _cache(root, key_file).load("unet", KEY) is None
    if ROOT:
        os.chmod(entry, 0o755)
        os.chown(entry, NOBODY, -1)  # owned by another user
        cache = _cache(root, key_file)
        assert cache.load("unet", KEY) is None and cache.last_miss == "untrusted"


def test_the_key_file_is_made_private_and_a_shared_one_is_refused(saved, key_file, caplog):
    root, _ = saved
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(key_file.parent.stat().st_mode) == 0o700
    os.chmod(key_file, 0o644)
    cache = _cache(root, key_file)
    with caplog.at_level(logging.WARNING, logger="onediffx.graph_cache"):
        assert cache.load("unet", KEY) is None
    assert any(f"chmod 600 {key_file}" in m for m in _warnings(caplog))


# -- real graphs -----------------------------------------------------------------------------------

PROMPT = "a photo of an astronaut riding a horse on the moon"  # the CLI's default


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """The tiny SD UNet compiled once at 64x64 and saved (with its C++ kernels), as the CLI calls it."""
    from onediffx.compile import compile_options, compile_pipe, save_pipe
    from onediffx.models.tiny import tiny_sd

    work = tmp_path_factory.mktemp("compiled")
    pipe = tiny_sd()
    pipe.set_progress_bar_config(disable=True)
    compile_pipe(pipe, "inductor", compile_options("inductor", components=["unet"]))
    out = pipe(prompt=[PROMPT], height=64, width=64, num_inference_steps=2, guidance_scale=7.5,
               generator=[torch.Generator().manual_seed(0)], output_type="pil")
    key_file = work / "graph-cache.key"
    written = save_pipe(pipe, str(work / "graphs"), key_file=str(key_file))
    return dict(pipe=pipe, cache_dir=work / "graphs", key_file=key_file, written=written,
                image=np.asarray(out.images[0], dtype=np.int16), threads=torch.get_num_threads())


@pytest.mark.slow
def test_a_hit_that_compiles_is_reported_as_a_miss_and_saved_anew(compiled, compose_run, tmp_path, caplog):
    """A loaded graph that does not serve the first call (as a 2-thread graph under 1 thread did)."""
    from onediffx.compile import compile_state
    from onediffx.generate import Settings, generate
    from onediffx.resolver import assemble

    cache_dir = tmp_path / "graphs"
    shutil.copytree(compiled["cache_dir"], cache_dir)
    manifest = json.loads(next(cache_dir.rglob("manifest.json")).read_text())
    loaded = _cache(cache_dir, compiled["key_file"]).load("unet", manifest["key"])
    wrong = [[[[2, 4, 16, 16], "float32"]]]  # signed by the key's owner, but for a call that never comes

    def only_wrong() -> None:  # a save keeps other signatures' graphs: remove the entry first
        shutil.rmtree(loaded.path)
        _cache(cache_dir, compiled["key_file"]).save("unet", manifest["key"], loaded.blobs, wrong, loaded.kernels)

    only_wrong()
    common = ["compile=inductor", "compile.components=[unet]", f"cache.dir={cache_dir}",
              f"cache.key_file={compiled['key_file']}", "steps=2", "height=64", "width=64"]
    asm = assemble(compose_run(*common))
    assert asm.report["load-graph"]["hit"] is True and asm.report["warmup"]["enabled"] is False
    with caplog.at_level(logging.WARNING, logger="onediffx.graph_cache"):
        image = generate(asm, Settings.from_config(asm.cfg)).images[0]
        asm.close()
    load, save = asm.report["load-graph"], asm.report["save-graph"]
    assert load["hit"] is False and load["reason"] == "compiled after load" and load["compiled_after_load"] == 1
    assert save["saved"] is True and save["written"]["unet"]["graphs"] == 2
    assert any("yet the first call compiled 1 more" in m for m in _warnings(caplog))
    assert np.abs(np.asarray(image, dtype=np.int16) - compiled["image"]).max() <= 2
    again = assemble(compose_run(*common))  # the next start: a real hit
    generate(again, Settings.from_config(again.cfg))
    again.close()
    assert again.report["load-graph"]["hit"] is True and "reason" not in again.report["load-graph"]
    assert compile_state(again.pipe).saveable["unet"].compiles == 0
    # With the warm-up kept on a hit (launches), the warm-up is the first call: save-graph tells.
    only_wrong()
    warmed = assemble(compose_run(*common, "warmup.on_cache_hit=run"))
    load, save = warmed.report["load-graph"], warmed.report["save-graph"]
    assert warmed.report["warmup"]["enabled"] is True
    assert load["hit"] is False and load["reason"] == "compiled after load" and load["compiled_after_load"] == 1
    assert save["saved"] is True and save["written"]["unet"]["graphs"] == 2


@pytest.mark.slow
def test_kernels_another_process_builds_during_a_load_do_not_turn_a_hit_into_a_rebuild(compiled, compose_run,
                                                                                      tmp_path, monkeypatch):
    """Inductor's cache folder is shared (a parallel fill, a second replica, parallel tests): a kernel
    another process writes there while this one loads is not one this load rebuilt. It made CI's
    launch test report "kernels rebuilt" on a hit when two test workers ran side by side."""
    from onediffx.compile import dispatch
    from onediffx.graph_cache.kernels import inductor_cache_dir
    from onediffx.resolver import assemble

    cache_dir = tmp_path / "graphs"
    shutil.copytree(compiled["cache_dir"], cache_dir)
    other = inductor_cache_dir() / "zz" / ("c" + "0" * 51 + ".so")  # named as Inductor names its kernels
    load, written = dispatch.CompiledForward.load, []

    def load_beside_another_process(self, blobs, signatures):
        other.parent.mkdir(parents=True, exist_ok=True)
        other.write_bytes(b"not ours")
        written.append(other)
        return load(self, blobs, signatures)

    monkeypatch.setattr(dispatch.CompiledForward, "load", load_beside_another_process)
    try:
        asm = assemble(compose_run("compile=inductor", "compile.components=[unet]", f"cache.dir={cache_dir}",
                                   f"cache.key_file={compiled['key_file']}", "steps=2", "height=64", "width=64"))
        asm.close()
    finally:
        other.unlink(missing_ok=True)
    assert written  # the other process's kernel did appear during the load
    load = asm.report["load-graph"]
    assert load["hit"] is True and load["components"]["unet"]["kernels_built"] == 0, load


@pytest.mark.slow
def test_restart_with_another_thread_count_and_an_empty_inductor_cache(compiled, tmp_path):
    """Saved with 2 threads, started with 1: a miss that compiles and saves (never a "hit" that
    compiles); the next start with 1 thread and an emptied Inductor cache folder is a hit that
    builds no C++ kernel (they came bundled with the entry); without bundled kernels, the rebuild
    is reported as a miss and the entry saved again with them."""
    threads = 1 if compiled["threads"] != 1 else 2
    cache_dir = tmp_path / "graphs"
    shutil.copytree(compiled["cache_dir"], cache_dir)
    args = ["run", "compile=inductor", "compile.components=[unet]", f"cache.dir={cache_dir}", "steps=2"]
    env = {"OMP_NUM_THREADS": str(threads), "ONEDIFFX_CACHE_KEY": str(compiled["key_file"])}
    metrics = []
    for run, inductor in (("other-threads", tmp_path / "inductor-1"), ("restart", tmp_path / "inductor-empty")):
        proc = run_cli(*args, f"hydra.run.dir={run}", cwd=tmp_path,
                       env={**env, "TORCHINDUCTOR_CACHE_DIR": str(inductor)})
        assert proc.returncode == 0, proc.stderr
        metrics.append(json.loads((tmp_path / run / "metrics.json").read_text()))
    first, restart = metrics
    load = first["stages"]["load-graph"]
    assert load["hit"] is False and load["stale"] is True and load["components"]["unet"]["reason"] == "stale"
    assert first["compile_counters"]["graphs_compiled"] == 1 and first["stages"]["save-graph"]["saved"] is True
    assert first["stages"]["save-graph"]["written"]["unet"]["kernels"] > 0
    assert len(list((cache_dir / "unet").iterdir())) >= 2  # one entry per thread count (plus lock files)
    load = restart["stages"]["load-graph"]
    assert load["hit"] is True, load
    assert load["components"]["unet"]["kernels_built"] == 0 and load["components"]["unet"]["kernels_restored"] > 0
    assert restart["compile_counters"]["graphs_compiled"] == 0 and restart["stages"]["save-graph"]["saved"] is False
    # The same entry without its kernels (as a torch that bundled none would leave it), another empty
    # Inductor folder: the graphs load, the kernels are rebuilt, and that is reported, not a hit.
    entry = Path(restart["stages"]["load-graph"]["dir"]) / "unet"
    manifest = next(m for m in entry.glob("*/manifest.json") if json.loads(m.read_text())["kernels"]
                    and json.loads(m.read_text())["key"]["process"]["num_threads"] == threads)
    key = json.loads(manifest.read_text())["key"]
    loaded = _cache(cache_dir, compiled["key_file"]).load("unet", key)
    _cache(cache_dir, compiled["key_file"]).save("unet", key, loaded.blobs, loaded.signatures, [])
    proc = run_cli(*args, "hydra.run.dir=no-kernels", cwd=tmp_path,
                   env={**env, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor-empty-2")})
    assert proc.returncode == 0, proc.stderr
    rebuilt = json.loads((tmp_path / "no-kernels" / "metrics.json").read_text())
    load = rebuilt["stages"]["load-graph"]
    assert load["hit"] is False and load["components"]["unet"]["reason"] == "kernels rebuilt", load
    assert load["components"]["unet"]["kernels_built"] > 0 and rebuilt["compile_counters"]["graphs_compiled"] == 0
    assert rebuilt["stages"]["save-graph"]["written"]["unet"]["kernels"] > 0  # saved again, with them
    assert len(_cache(cache_dir, compiled["key_file"]).load("unet", key).kernels) > 0
    from PIL import Image

    for run, m in zip(("other-threads", "restart", "no-kernels"), (*metrics, rebuilt)):
        image = np.asarray(Image.open(tmp_path / run / m["outputs"][0]), dtype=np.int16)
        assert np.abs(image - compiled["image"]).max() <= 2


def test_a_graph_that_cannot_be_serialized_is_one_warning_and_nothing_written(compiled, tmp_path, caplog, monkeypatch):
    """On the H200, graphs traced with AOTAutograd's cache off had no ``serialize`` and the save took
    a whole server down with it: a save that fails is a warning, never the run."""
    from onediffx.compile import compile_state, save_pipe

    unet = compile_state(compiled["pipe"]).saveable["unet"]

    def unserializable():
        raise TypeError("'NoneType' object is not callable")

    monkeypatch.setattr(unet, "serialize", unserializable)
    with caplog.at_level(logging.WARNING, logger="onediffx.compile"):
        written = save_pipe(compiled["pipe"], str(tmp_path / "graphs"), key_file=str(compiled["key_file"]))
    assert written == {} and not list((tmp_path / "graphs").rglob("manifest.json"))
    assert [m for m in _warnings(caplog) if "unet could not be serialized (TypeError" in m], _warnings(caplog)
