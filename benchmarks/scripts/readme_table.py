"""Fill the README's headline table from one bench record, so every figure in it comes from one run.

    python benchmarks/scripts/readme_table.py benchmarks/results/<date>-<card>/<scenario>.json [README.md]

The table goes between ``<!-- bench-table:begin -->`` and ``<!-- bench-table:end -->``. Only a record
the bench marked as headline (written with ``bench.headline=true`` and no other process on the GPU)
is accepted: a ratio measured beside another job is not one to print at the top of the README.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

BEGIN, END = "<!-- bench-table:begin -->", "<!-- bench-table:end -->"


def _num(value: Any, unit: str = "", digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}f}{unit}" if isinstance(value, float) else f"{value}{unit}"


def _speed_rows(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| what | per image | vs eager | vs diffusers-docs recipe | UNet step | peak memory |",
             "| --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        if "e2e_s" not in row or "(again" in row["method"]:
            continue
        lines.append(f"| {row['method']} | {_num(row['e2e_s'], ' s')} | {_num(row.get('speedup'), 'x', 2)} | "
                     f"{_num(row.get('speedup_vs_recipe'), 'x', 3)} | {_num(row.get('unet_step_ms'), ' ms', 1)} | "
                     f"{_num(row.get('peak_gib'), ' GiB', 2)} |")
    return lines


def _start_rows(rows: list[dict[str, Any]]) -> list[str]:
    starts = [r for r in rows if "first_image_s" in r]
    if not starts:
        return []
    lines = ["", "| start | first image after the weights load | whole process | graphs compiled |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['method']} | {_num(r['first_image_s'], ' s', 2)} | {_num(r['process_s'], ' s', 1)} | "
              f"{r.get('graphs_compiled', '')} |" for r in starts]
    return lines


def table(record: dict[str, Any], path: str) -> str:
    """The markdown block: a dated caption naming the card, commit and record, then the rows."""
    caption = (f"{record['time_utc'][:10]}, {record['device_name']}, commit {record['commit'][:10]}: "
               f"{record['model']}{' (synthetic weights)' if record['synthetic'] else ''}, "
               f"{record['height']}x{record['width']}, {record['steps']} steps, one process "
               f"(record: [`{path}`]({path}))")
    return "\n".join([caption, "", *_speed_rows(record["rows"]), *_start_rows(record["rows"])])


def fill(readme: str, block: str) -> str:
    if readme.count(BEGIN) != 1 or readme.count(END) != 1 or readme.index(BEGIN) > readme.index(END):
        raise ValueError(f"the README needs one {BEGIN} line followed by one {END} line")
    head, rest = readme.split(BEGIN)
    return f"{head}{BEGIN}\n{block}\n{END}{rest.split(END, 1)[1]}"


def main(argv: list[str]) -> int:
    if not 1 <= len(argv) <= 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    record_path = Path(argv[0])
    readme_path = Path(argv[1] if len(argv) > 1 else "README.md")
    record = json.loads(record_path.read_text(encoding="utf-8"))
    if record.get("headline") is not True:
        print(f"readme_table: {record_path} is not a headline record (gpu_alone={record.get('gpu_alone')}): "
              "rerun the bench with bench.headline=true and the GPU to itself", file=sys.stderr)
        return 1
    try:
        relative = record_path.resolve().relative_to(readme_path.resolve().parent).as_posix()
    except ValueError:
        relative = record_path.as_posix()
    readme_path.write_text(fill(readme_path.read_text(encoding="utf-8"), table(record, relative)), encoding="utf-8")
    print(f"readme_table: {readme_path} table from {relative}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
