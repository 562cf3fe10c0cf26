"""Hostile input, each written as the probe that found it: one line and a non-zero exit, nothing
half-written, nothing lost, data never evaluated as code."""

from __future__ import annotations

import json
import os
import pickle
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from conftest import REPO, run_cli
from onediffx.commands.batch.journal import intact as _intact, pending
from onediffx.commands.batch.prompts import read_prompts
from onediffx.config import validate
from onediffx.config.dirname import safe_dirname
from onediffx.errors import ConfigError, NonFiniteError
from onediffx.lora import LoraFormatError
from onediffx.lora.sources import read_lora
from onediffx.lora.synthetic import lora_targets, random_lora, save_kohya
from onediffx.models.tiny import tiny_sdxl


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    return {**env, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}


def _errors(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("onediffx: error:")]


def _manifest(out: Path) -> list[dict]:
    path = out / "manifest.jsonl"
    return [json.loads(t) for t in path.read_text().splitlines() if t.endswith("}")] if path.is_file() else []


def _prompts(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({"prompt": f"a photo number {i}", "seed": i}) + "\n" for i in range(n)))
    return path


# -- bounds: every per-call value has a range, checked before anything loads --------------------------


@pytest.mark.parametrize("override, key, allowed", [
    ("seed=100000000000000000000", "seed", "an integer from 0 to 2^63-1"),
    ("seed=9223372036854775807 num_images=2", "seed", "seed + num_images - 1 <= 2^63-1"),
    ("steps=1000000000", "steps", "an integer from 1 to 1000"),
    ("height=100000", "height", "a multiple of 8 from 8 to 16384"),
    ("width=0", "width", "a multiple of 8 from 8 to 16384"),
    ("num_images=1000000", "num_images", "an integer from 1 to 256"),
    ("guidance=inf", "guidance", "a finite number from 0 to 100"),
    ("guidance=nan", "guidance", "a finite number from 0 to 100"),
    ("lora=[emoji] lora.emoji.scale=inf", "lora.emoji.scale", "a finite number"),
    ("+typo=1", "typo", "not a key of the RunConfig config"),
    ("+lora.mine.source=a.safetensors +lora.mine.scle=2", "lora.mine.scle", "not a key of a LoRA entry"),
    ("+lora.mine.scale=2", "lora.mine.source", "a LoRA needs `source`"),
    ("+lora.mine.source=a.safetensors +lora.mine.scale=1e9", "lora.mine.scale", "a finite number from -100 to 100"),
    ("+warmup.typo=1", "warmup.typo", "not a key of the WarmupConfig config"),
])
def test_out_of_range_values_are_one_line_naming_the_key(compose_run, override, key, allowed):
    with pytest.raises(ConfigError) as err:
        validate(compose_run(*override.split()))
    assert str(err.value).startswith(f"{key}: ") and allowed in str(err.value)


def test_unknown_key_on_the_command_line_fails_before_torch_loads(tmp_path):
    proc = run_cli("run", "+typo=1", cwd=tmp_path)
    assert proc.returncode == 2 and _errors(proc) == [
        "onediffx: error: typo: not a key of the RunConfig config; check its spelling (`onediffx run --cfg job` "
        "prints every key), or put a plugin's options under plugin_options"]
    assert "Traceback" not in proc.stderr and not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_a_call_that_cannot_fit_in_memory_is_refused_before_the_load(compose_run):
    from onediffx.resolver import assemble

    cfg = compose_run("height=16384", "width=16384", "num_images=256")
    with pytest.raises(ConfigError, match=r"^height, width, num_images: 16384x16384 x 256 image\(s\) needs at least"):
        assemble(cfg)


@pytest.mark.parametrize("raw, expected", [
    (b'{"prompt": "x", "seed": 1180591620717411303424}', "seed: 1180591620717411303424 is not allowed"),
    (b'{"prompt": "x", "steps": 1000000000}', "steps: 1000000000 is not allowed"),
    (b'{"prompt": "x", "guidance": NaN}', "guidance: nan is not allowed; expected a finite number"),
    (b'{"prompt": "x", "height": 100000}', "height: 100000 is not allowed"),
    (b'{"prompt": "\\ud800 lone"}', "prompt: '\\ud800 lone' is not allowed; expected a non-empty string of valid Unicode"),
    (b'{"prompt": "caf\xe9"}', "not UTF-8 text (byte 16 of the line)"),
    (b"[" * 100_000 + b"]" * 100_000, "JSON nested too deeply"),
])
def test_bad_batch_values_fail_up_front_with_their_line(compose_run, tmp_path, raw, expected):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"prompt": "fine"}\n' + raw + b"\n")
    with pytest.raises(ConfigError) as err:
        read_prompts(compose_run(f"prompts={path}"))
    assert f"{path} line 2: " in str(err.value) and expected in str(err.value)


def test_files_that_are_not_what_their_key_says_are_one_line(tmp_path):
    from onediffx.generate import conditioning_image
    from onediffx.models.loader import _load_path

    text = tmp_path / "photo.png"
    text.write_text("not an image\n")
    with pytest.raises(ConfigError, match=r"^image: '.*photo.png' is not an image Pillow can read"):
        conditioning_image(str(text), 64, 64)
    fake = tmp_path / "model.safetensors"
    fake.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    with pytest.raises(ConfigError, match=r"^model.path: '.*model.safetensors' is not a readable safetensors file"):
        _load_path(object, str(fake), torch.float32, None)


# -- prompts are data ------------------------------------------------------------------------------------


def test_batch_prompts_are_literal_text_never_interpolated(tmp_path):
    from hydra import compose, initialize_config_dir

    from onediffx.config import register_configs
    from onediffx.generate import Settings, generate
    from onediffx.resolver import assemble
    from onediffx.resources import conf_dir

    literal = "${oc.env:SECRET_TOKEN}"
    lines = [{"prompt": literal, "steps": 2}, {"prompt": "costs ${5", "steps": 2}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    proc = subprocess.run([sys.executable, "-m", "onediffx", "run", "prompts=p.jsonl", "hydra.run.dir=out"],
                          cwd=tmp_path, env={**_env(), "SECRET_TOKEN": "hunter2"}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out"
    assert [e["prompt"] for e in _manifest(out)] == [literal, "costs ${5"]
    assert not any("hunter2" in p.read_text(errors="ignore") for p in out.rglob("*") if p.is_file())

    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose("run", overrides=["steps=2"])
    asm = assemble(cfg)
    made = np.asarray(Image.open(out / _manifest(out)[0]["file"]), dtype=np.float32)
    for prompt, same in ((literal, True), ("hunter2", False)):
        image = generate(asm, Settings.from_config(cfg, prompt=prompt)).images[0]
        close = np.abs(np.asarray(image, dtype=np.float32) - made).max() <= 2
        assert close == same, prompt


# -- output folders ---------------------------------------------------------------------------------------


def test_safe_dirname_keeps_one_component_under_the_limit():
    assert safe_dirname("seed=1,steps=2") == "seed=1,steps=2"
    escaped = safe_dirname("model.pretrained=../../../../tmp/victim")
    assert "/" not in escaped and ".." not in escaped
    long = safe_dirname("x" * 300)
    assert len(long) <= 100 and long != safe_dirname("x" * 301)


def test_run_folder_stays_under_outputs_whatever_the_overrides(tmp_path):
    work, victim = tmp_path / "work", tmp_path / "victim"
    work.mkdir()
    victim.mkdir()
    (victim / "config.yaml").write_text("precious\n")
    shapes = ",".join(f"{{height:64,width:{64 + 8 * i}}}" for i in range(14))
    proc = run_cli("run", f"model.pretrained=../{'../' * 8}{victim}", f"warmup.shapes=[{shapes}]",
                   "warmup.runs=0", "steps=1", cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in victim.iterdir()) == ["config.yaml"]
    assert (victim / "config.yaml").read_text() == "precious\n"
    (run_dir,) = (work / "outputs" / "run").iterdir()
    assert len(run_dir.name) < 255 and (run_dir / "metrics.json").is_file()


# -- one process per output folder; resume exactly once --------------------------------------------------


def _start(tmp_path: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "onediffx", "run", *args], cwd=tmp_path, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _wait_for(predicate, proc: subprocess.Popen, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while not predicate() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert predicate(), "the first run ended before the probe could start"


def test_second_batch_on_a_held_folder_fails_at_once_and_nothing_is_duplicated(tmp_path):
    out = tmp_path / "out"
    args = [f"prompts={_prompts(tmp_path / 'p.jsonl', 6)}", "steps=2", f"hydra.run.dir={out}"]
    first = _start(tmp_path, *args)
    _wait_for(lambda: (out / ".onediffx.lock").is_file() and (out / ".hydra" / "overrides.yaml").is_file(), first)
    overrides = (out / ".hydra" / "overrides.yaml").read_text()
    os.killpg(first.pid, signal.SIGSTOP)  # still alive and holding the folder, however slow the second start
    try:
        second = run_cli("run", *args, "resume=true", cwd=tmp_path)
    finally:
        os.killpg(first.pid, signal.SIGCONT)
    assert second.returncode == 2 and _errors(second) == [
        f"onediffx: error: output folder {out} is in use by another onediffx run (pid {first.pid}); "
        "wait for it to finish, or choose another hydra.run.dir"]
    assert first.wait(timeout=600) == 0, first.stderr.read()
    assert sorted(e["index"] for e in _manifest(out)) == list(range(6))
    assert (out / ".hydra" / "overrides.yaml").read_text() == overrides  # the refused run's .hydra is undone
    assert not (out / ".onediffx.lock").exists()


def test_kill_then_two_resumers_do_every_image_exactly_once(tmp_path):
    out = tmp_path / "out"
    args = [f"prompts={_prompts(tmp_path / 'p.jsonl', 5)}", "steps=2", f"hydra.run.dir={out}"]
    first = _start(tmp_path, *args)
    try:
        _wait_for(lambda: len(_manifest(out)) >= 1, first)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    done_before = _manifest(out)
    resumers = [_start(tmp_path, *args, "resume=true") for _ in range(2)]
    codes = [p.wait(timeout=600) for p in resumers]
    messages = [p.stderr.read() for p in resumers]
    assert sorted(codes) in ([0, 0], [0, 2]), messages
    for code, message in zip(codes, messages):
        if code == 2:
            assert "is in use by another onediffx run (pid" in message
    entries = _manifest(out)
    assert sorted(e["index"] for e in entries) == list(range(5)) and entries[: len(done_before)] == done_before
    assert all(_intact(out / e["file"], e) for e in entries)
    assert not list(out.glob("*.tmp"))


def test_resume_redoes_an_image_whose_file_does_not_match_the_manifest(compose_run, tmp_path):
    cfg = compose_run(f"prompts={_prompts(tmp_path / 'p.jsonl', 2)}")
    items = read_prompts(cfg).items
    for item in items:
        Image.new("RGB", (8, 8)).save(tmp_path / item.file)
    import hashlib

    done = {}
    for item in items:
        data = (tmp_path / item.file).read_bytes()
        done[item.index] = {**item.spec(), "file": item.file, "bytes": len(data),
                            "sha256": hashlib.sha256(data).hexdigest()}
    assert pending(items, done, tmp_path) == []
    path = tmp_path / items[1].file
    path.write_bytes(path.read_bytes()[:-10])  # torn by a crash of the disk, not of the process
    assert pending(items, done, tmp_path) == [items[1]]


# -- non-finite numbers -------------------------------------------------------------------------------------


def test_latents_that_turn_non_finite_fail_with_the_step(compose_run):
    from onediffx.generate import Settings, generate
    from onediffx.resolver import assemble

    cfg = compose_run("steps=3")
    asm = assemble(cfg)
    with torch.no_grad():
        asm.pipe.unet.conv_out.weight[0, 0, 0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="NaN/Inf at denoising step 1 of 3") as err:
        generate(asm, Settings.from_config(cfg))
    assert err.value.step == 1


def test_cli_run_whose_lora_blows_up_the_latents_reports_failed_and_writes_no_image(tmp_path):
    path = save_kohya(random_lora(lora_targets(tiny_sdxl(), components=("unet",)), 4, seed=1, strength=1e30),
                      tmp_path / "huge.safetensors")
    proc = run_cli("run", "model=tiny_xl", f"+lora.huge.source={path}", "steps=2", "hydra.run.dir=out", cwd=tmp_path)
    assert proc.returncode == 1 and len(_errors(proc)) == 1 and "NaN/Inf at denoising step" in _errors(proc)[0]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["status"] == "failed" and metrics["non_finite_step"] >= 1
    assert not list((tmp_path / "out").glob("*.png"))


# -- LoRA headers that escaped the one-line error ---------------------------------------------------------


def _raw_safetensors(path: Path, header: bytes, data: bytes = b"", size: int | None = None) -> Path:
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(header)) + header + data)
        if size is not None:
            f.truncate(size)  # sparse: declares more than it stores
    return path


def _header(**entries: dict) -> bytes:
    return json.dumps(entries).encode()


_BIG = _header(a={"dtype": "F32", "shape": [64 * 2**30], "data_offsets": [0, 256 * 2**30]})
"""256 GiB declared, stored as a sparse file: more than any machine that runs these tests has free."""
LORA_CASES = {
    "nested_100000_deep": (lambda p: _raw_safetensors(p, b"[" * 100_000 + b"]" * 100_000), "nested too deeply"),
    "dimension_2_64_times_zero": (lambda p: _raw_safetensors(
        p, _header(a={"dtype": "F32", "shape": [2**64, 0], "data_offsets": [0, 0]}, b={
            "dtype": "F32", "shape": [1], "data_offsets": [0, 4]}), b"\0" * 4), "longer than the file"),
    "declared_256_gib": (lambda p: _raw_safetensors(
        p, _BIG, size=8 + len(_BIG) + 256 * 2**30), "GiB free on cpu"),
    "overlapping_offsets": (lambda p: _raw_safetensors(
        p, _header(a={"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                   b={"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}), b"\0" * 12), "overlaps"),
}


@pytest.mark.parametrize("case", list(LORA_CASES))
def test_lora_header_edge_cases_are_one_line_naming_the_file(case, tmp_path):
    make, reason = LORA_CASES[case]
    path = make(tmp_path / f"{case}.safetensors")
    with pytest.raises(LoraFormatError) as err:
        read_lora(str(path), torch.device("cpu"))
    message = str(err.value)
    assert str(path) in message and reason in message and "\n" not in message


def test_lora_with_nan_factors_is_refused_when_read(tmp_path):
    path = tmp_path / "nan.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.ones(4, 8), "lora_unet_x.lora_up.weight":
               torch.tensor([[float("nan")] * 4] * 8)}, str(path))
    with pytest.raises(LoraFormatError, match=r"tensor 'lora_unet_x.lora_up.weight' holds NaN or Inf"):
        read_lora(str(path), torch.device("cpu"))
