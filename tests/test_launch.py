"""Production launches (``+launch=...``), their start-up report, and the launcher configs."""

from __future__ import annotations

import json
import re

import pytest
from hydra import compose, initialize_config_dir

from conftest import job_dirs, run_cli
from onediffx.resources import conf_dir
from onediffx.config import register_configs, validate
from onediffx.startup import cache_status, startup_facts, startup_table


@pytest.mark.parametrize(
    "launch, model, backend, deepcache, shapes",
    [
        ("sdxl_prod", "sdxl", "inductor", False, [[1024, 1024], [1216, 832], [832, 1216]]),
        ("sd15_prod", "sd15", "inductor", True, [[512, 512], [768, 512], [512, 768]]),
        ("tiny_prod", "tiny", "none", False, [[64, 64]]),
        ("flux_prod", "flux_dev", "inductor", False, [[1024, 1024], [1344, 768], [768, 1344]]),
        ("sd35_prod", "sd35_large", "inductor", False, [[1024, 1024], [1344, 768], [768, 1344]]),
    ],
)
def test_launch_presets_compose_and_validate(compose_run, launch, model, backend, deepcache, shapes):
    cfg = compose_run(f"+launch={launch}")
    validate(cfg)
    assert cfg.model.name == model and cfg.compile.backend == backend and cfg.deepcache.enabled is deepcache
    assert [[s.height, s.width] for s in cfg.warmup.shapes] == shapes
    assert cfg.cache.enabled and cfg.startup_report and dict(cfg.lora) == {}
    # A launch is a starting point: command-line overrides still win.
    assert compose_run(f"+launch={launch}", "warmup.runs=0", "cache.dir=/srv/graphs").cache.dir == "/srv/graphs"


def test_tiny_launch_runs_and_reports_its_startup(tmp_path):
    proc = run_cli("run", "+launch=tiny_prod", f"cache.dir={tmp_path / 'graphs'}", "steps=2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (job,) = job_dirs(tmp_path / "outputs")
    metrics = json.loads((job / "metrics.json").read_text())
    stages = metrics["stages"]
    assert stages["warmup"]["shapes"] == [[64, 64, 1]]  # the launch's shapes were prepared
    (call,) = stages["warmup"]["call_seconds"]  # each warm-up call's own time, inside the stage's
    assert 0 < call <= stages["warmup"]["seconds"] + 5e-4  # call_seconds are rounded to the millisecond
    assert metrics["startup"] == {"seconds": pytest.approx(sum(f.get("seconds", 0) for f in stages.values())),
                                  "compile": "off", "graph_cache": "off"}
    out = proc.stdout
    assert "start-up of launch tiny_prod: model tiny on cpu" in out
    table = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.startswith("  ")}
    assert float(table["load"][0]) == pytest.approx(stages["load"]["seconds"], abs=0.006)
    assert float(table["warmup"][0]) == pytest.approx(stages["warmup"]["seconds"], abs=0.006)
    assert table["compile"] == ["-", "off"] and table["load-graph"] == ["-", "off"]
    assert float(table["total"][0]) == pytest.approx(metrics["startup"]["seconds"], abs=0.006)
    assert "graph cache: not used" in out


def test_startup_table_says_what_the_graph_cache_did():
    """Stage facts as the compile / graph-cache stages note them: hit, or miss then compiled and saved."""
    base = {"load": {"seconds": 2.0}, "compile": {"enabled": True, "seconds": 30.0, "backend": "inductor"}}
    missed = {**base, "load-graph": {"enabled": True, "seconds": 0.1, "hit": False},
              "warmup": {"enabled": True, "seconds": 40.0}, "save-graph": {"enabled": True, "seconds": 1.0, "saved": True}}
    hit = {**base, "load-graph": {"enabled": True, "seconds": 0.5, "hit": True}, "save-graph": {"enabled": False}}
    stale = {**missed, "load-graph": {"enabled": True, "seconds": 0.1, "hit": False, "stale": True}}
    assert [cache_status(s) for s in (missed, hit, stale)] == ["miss, saved", "hit", "stale, saved"]
    assert startup_facts(missed, "inductor") == {"seconds": pytest.approx(73.1), "compile": "inductor",
                                                 "graph_cache": "miss, saved"}
    table = startup_table(missed, backend="inductor", cache_dir="/c", title="t", first_image_s=1.5)
    assert "graph cache: miss in /c; compiled and saved" in table
    assert re.search(r"^  load-graph +0\.10  cache miss, saved$", table, re.M)
    assert re.search(r"^  first image +1\.50$", table, re.M) and re.search(r"^  total +73\.10$", table, re.M)
    assert "graph cache: stale in /c; compiled and saved" in startup_table(stale, backend="x", cache_dir="/c", title="t")
    assert "graph cache: loaded from /c" in startup_table(hit, backend="inductor", cache_dir="/c", title="t")


@pytest.mark.parametrize(
    "launcher, expected",
    [
        ("local_gpus", {"_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher", "n_jobs": 2}),
        ("slurm", {"_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher",
                   "gpus_per_node": 1, "tasks_per_node": 1, "timeout_min": 120}),
    ],
)
def test_launcher_configs_compose(launcher, expected):
    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose("run", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    assert {k: cfg.hydra.launcher[k] for k in expected} == expected


@pytest.mark.slow
def test_launch_with_an_empty_cache_compiles_saves_and_the_next_launch_loads(tmp_path):
    """The production path: first start compiles and saves; the restart loads and compiles nothing."""
    args = ["run", "+launch=tiny_prod", "compile.backend=inductor", "compile.components=[unet]",
            f"cache.dir={tmp_path / 'graphs'}", "steps=2"]
    first = run_cli(*args, "hydra.run.dir=first", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert f"graph cache: miss in {tmp_path / 'graphs'}; compiled and saved" in first.stdout
    second = run_cli(*args, "hydra.run.dir=second", cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert f"graph cache: loaded from {tmp_path / 'graphs'}" in second.stdout
    counters = [json.loads((tmp_path / d / "metrics.json").read_text())["compile_counters"] for d in ("first", "second")]
    assert counters[0]["graphs_compiled"] == 1 and counters[1]["graphs_compiled"] == 0
    assert counters[1]["graphs_loaded"] == 1 and counters[1]["dynamo_graphs"] == 0
