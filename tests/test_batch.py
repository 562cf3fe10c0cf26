"""Batch prompts: the file's lines and errors, and a run killed midway then resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from conftest import REPO, run_cli
from onediffx.commands.batch.journal import append_manifest, drop_torn_line, read_manifest
from onediffx.commands.batch.prompts import read_prompts
from onediffx.config import validate
from onediffx.errors import ConfigError, NotFoundError

LINES = [
    '{"prompt": "a red fox", "seed": 1}',
    '{"prompt": "a blue bird", "seed": 2, "negative_prompt": "blurry"}',
    '',
    '{"prompt": "a castle", "height": 48, "width": 64, "steps": 1, "guidance": 2.5}',
    '{"prompt": "oops", "stpes": 3}',
    '{"prompt": "a green field", "seed": 5}',
]


def write_prompts(path: Path, lines: list[str] = LINES) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def manifest_lines(out: Path) -> list[dict]:
    path = out / "manifest.jsonl"
    if not path.is_file():
        return []
    return [json.loads(t) for t in path.read_text().splitlines() if t.endswith("}")]


def test_lines_take_run_defaults_and_keep_their_index(compose_run, tmp_path):
    cfg = compose_run(f"prompts={write_prompts(tmp_path / 'p.jsonl')}", "on_bad_line=skip", "seed=9", "steps=3")
    parsed = read_prompts(cfg)
    assert [i.index for i in parsed.items] == [0, 1, 2, 4]  # the skipped bad line keeps its index
    assert [i.line for i in parsed.items] == [1, 2, 4, 6]
    fox, bird, castle, field = parsed.items
    assert (fox.seed, fox.height, fox.width, fox.steps, fox.guidance) == (1, 64, 64, 3, 7.5)
    assert bird.negative_prompt == "blurry" and castle.seed == 9
    assert (castle.height, castle.width, castle.steps, castle.guidance) == (48, 64, 1, 2.5)
    assert field.file == "image_00004_seed5.png"
    assert parsed.bad_lines == [{"line": 5, "error": parsed.bad_lines[0]["error"]}]
    assert "unknown key 'stpes'" in parsed.bad_lines[0]["error"]


@pytest.mark.parametrize(
    "line, expected",
    [
        ('{"prompt": "x", "seed": 1', "line 2: not valid JSON"),
        ('["a list"]', "line 2: expected a JSON object"),
        ('{"seed": 3}', "line 2: 'prompt' is required"),
        ('{"prompt": "x", "height": 50}', "line 2: height: 50 is not allowed; expected a multiple of 8 from 8 to 16384"),
        ('{"prompt": "x", "lora_scales": {"emoji": 0.5}}', "line 2: lora_scales: 'emoji' is not in the LoRA stack"),
    ],
)
def test_bad_line_fails_with_its_number(compose_run, tmp_path, line, expected):
    cfg = compose_run(f"prompts={write_prompts(tmp_path / 'p.jsonl', [LINES[0], line])}")
    with pytest.raises(ConfigError) as err:
        read_prompts(cfg)
    assert str(err.value).startswith("prompts: ") and expected in str(err.value)
    assert "on_bad_line=skip" in str(err.value)


def test_missing_or_empty_file_and_resume_without_prompts(compose_run, tmp_path):
    with pytest.raises(NotFoundError, match="prompts: '.*nope.jsonl' does not exist"):
        read_prompts(compose_run(f"prompts={tmp_path / 'nope.jsonl'}"))
    with pytest.raises(ConfigError, match="holds no prompts"):
        read_prompts(compose_run(f"prompts={write_prompts(tmp_path / 'e.jsonl', [''])}"))
    with pytest.raises(ConfigError, match="resume: only batch runs resume"):
        validate(compose_run("resume=true"))


def test_torn_manifest_line_is_redone_not_glued_to_the_next(tmp_path):
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text('{"index": 0, "file": "a.png"}\n{"index": 1, "fi')  # killed mid-write
    drop_torn_line(manifest)
    append_manifest(manifest, {"index": 1, "file": "b.png"})
    assert read_manifest(manifest) == {0: {"index": 0, "file": "a.png"}, 1: {"index": 1, "file": "b.png"}}


@pytest.mark.parametrize(
    "content, expected",
    [
        ('{"prompt": "fine"}\n{"prompt": "broken"\n', "prompts: p.jsonl line 2: not valid JSON"),
        (None, "prompts: 'p.jsonl' does not exist"),
    ],
)
def test_cli_bad_or_missing_prompts_file_is_one_line(tmp_path, content, expected):
    if content is not None:
        (tmp_path / "p.jsonl").write_text(content)
    proc = run_cli("run", "prompts=p.jsonl", cwd=tmp_path)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("onediffx: error:")]
    assert len(errors) == 1 and expected in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr and not list(tmp_path.rglob("*.png"))


def test_killed_batch_resumes_with_every_prompt_done_once(tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl")
    out = tmp_path / "out"
    args = ["run", f"prompts={prompts}", "on_bad_line=skip", "steps=2", f"hydra.run.dir={out}"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.Popen([sys.executable, "-m", "onediffx", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not manifest_lines(out) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done_before = manifest_lines(out)
    assert 1 <= len(done_before) < 4, "the kill should land midway"

    resumed = run_cli(*args, "resume=true", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    entries = manifest_lines(out)
    assert sorted(e["index"] for e in entries) == [0, 1, 2, 4]  # each prompt exactly once
    assert entries[: len(done_before)] == done_before  # nothing done before the kill was redone
    for e in entries:
        image = Image.open(out / e["file"])
        assert image.size == (e["width"], e["height"]) and f"seed{e['seed']}" in e["file"]
    assert not list(out.glob("*.tmp"))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed"] == len(done_before) and metrics["generated"] == 4 - len(done_before)
    assert metrics["outputs"] == [e["file"] for e in sorted(entries, key=lambda e: e["index"])]
    assert metrics["bad_lines"][0]["line"] == 5 and "prompts:" in resumed.stderr  # the bar over prompts
