"""What a start-up cost, stage by stage: the table a launch prints and the facts sweeps compare.

A production restart is judged by its time to the first image, and by whether the compiled-graph
cache was used. Both are already in each stage's facts (``Assembly.report``); this module reads
them the same way for the launch table, ``metrics.json`` and the sweep summary, so the three agree.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

Facts = Mapping[str, Mapping[str, Any]]


def _on(facts: Optional[Mapping[str, Any]]) -> bool:
    return bool(facts) and facts.get("enabled", True) is not False


def compile_status(stages: Facts, backend: str) -> str:
    """``off`` when nothing was compiled, else the backend that compiled."""
    facts = stages.get("compile")
    if not _on(facts):
        return "off"
    return str(facts.get("backend", backend))


def cache_status(stages: Facts) -> str:
    """``hit``, ``miss``/``stale`` (``, saved`` once the fresh graphs are written), or ``off``."""
    load, save = stages.get("load-graph"), stages.get("save-graph")
    if not _on(load):
        return "off"
    if load.get("hit"):
        return "hit"
    status = "stale" if load.get("stale") else "miss"
    if _on(save) and save.get("saved"):
        status += ", saved"
    return status


def startup_seconds(stages: Facts) -> float:
    """Load plus every stage that ran: the time from process start-up work to a ready pipeline."""
    return float(sum(f.get("seconds", 0.0) for f in stages.values() if _on(f)))


def startup_facts(stages: Facts, backend: str) -> dict[str, Any]:
    """The start-up summary stored in ``metrics.json`` under ``startup``."""
    return {"seconds": startup_seconds(stages), "compile": compile_status(stages, backend),
            "graph_cache": cache_status(stages)}


def _stage_status(name: str, facts: Mapping[str, Any], stages: Facts, backend: str) -> str:
    if not _on(facts):
        return "off"
    if name == "compile":
        return compile_status(stages, backend)
    if name == "load-graph":
        return f"cache {cache_status(stages)}"
    if name == "save-graph":
        return "saved" if facts.get("saved") else "not saved"
    return "done"


def startup_table(stages: Facts, *, backend: str, cache_dir: str, title: str,
                  first_image_s: Optional[float] = None) -> str:
    """A short stage → seconds → status table, and one line on what the graph cache did."""
    width = max([len(n) for n in stages] + [len("first image")])
    lines = [title, f"  {'stage':<{width}}  {'seconds':>8}  status"]
    for name, facts in stages.items():
        seconds = f"{facts['seconds']:8.2f}" if _on(facts) and "seconds" in facts else f"{'-':>8}"
        lines.append(f"  {name:<{width}}  {seconds}  {_stage_status(name, facts, stages, backend)}")
    lines.append(f"  {'total':<{width}}  {startup_seconds(stages):8.2f}")
    if first_image_s is not None:
        lines.append(f"  {'first image':<{width}}  {first_image_s:8.2f}")
    cache = cache_status(stages)
    if cache == "off":
        lines.append("graph cache: not used (nothing compiled, or cache.enabled=false)")
    elif cache == "hit":
        lines.append(f"graph cache: loaded from {cache_dir}")
    else:
        saved = "compiled and saved" if cache.endswith("saved") else "compiled, not saved"
        lines.append(f"graph cache: {cache.split(',')[0]} in {cache_dir}; {saved}")
    return "\n".join(lines)
