"""The demo's optional lm-eval rows (`moe-lpr demo --benchmark DIR`): local task YAMLs run on every row.

DIR holds lm-eval task YAMLs (lm-eval's own format: `task`, `dataset_path`, `dataset_kwargs`, ...). A task named
`<benchmark>_<language>` counts for that language when the language is one of the run's (`belebele_hu`,
`mytask_el`); the others run but enter no average. Each row's model directory is run through
`moelpr.evaluate.harness.run_benchmark` (stock lm-eval `hf` with remote code, as `moe-lpr benchmark` does), and
the summary averages the run's own old and new languages. Results go to eval/benchmark/<row>.json (reused by
reruns) and results.json → `benchmark`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import yaml

from moelpr.errors import UserError


def task_names(tasks_dir: Path) -> list[str]:
    """The `task` names defined by the YAML files in `tasks_dir` (groups left out), sorted."""
    if not tasks_dir.is_dir():
        raise UserError(f"--benchmark {tasks_dir} is not a directory of lm-eval task YAML files")
    names = []
    for path in sorted(tasks_dir.rglob("*.yaml")):
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise UserError(f"cannot parse {path}: {str(err).splitlines()[0]}") from None
        if isinstance(data, dict) and isinstance(data.get("task"), str) and "group" not in data:
            names.append(data["task"])
    if not names:
        raise UserError(f"--benchmark {tasks_dir} defines no lm-eval task (no YAML file with a `task:` name)")
    return sorted(names)


def benchmark_rows(
    out: Path, tasks_dir: Path, langs: dict[str, list[str]], base: Path, log: Callable[[str], None]
) -> dict[str, Any]:
    """Run the tasks of `tasks_dir` on every row; {"tasks", "benchmarks", "rows": {row: summary}}."""
    from moelpr.demo.plans import METHODS
    from moelpr.evaluate.harness import language_benchmarks, require_lm_eval, run_benchmark
    from moelpr.utils.atomic import atomic_write_json

    require_lm_eval()
    tasks = task_names(tasks_dir)
    benchmarks = language_benchmarks(tasks, [*langs["old"], *langs["new"]])
    rows = {}
    for name in METHODS:
        path = out / "eval" / "benchmark" / f"{name}.json"
        if not path.is_file():
            record = run_benchmark(
                base if name == "base" else out / "models" / name,
                tasks,
                include_paths=[tasks_dir],
                include_defaults=False,
                bootstrap_iters=0,
                old=langs["old"],
                new=langs["new"],
                benchmarks=benchmarks,
            )
            atomic_write_json(path, record)
        rows[name] = json.loads(path.read_text())["summary"]
        parts = [f"{role} {avg['all']:.4f}" for role, avg in rows[name]["avg"].items() if "all" in avg]
        log(f"[demo] lm-eval {name:<18} {', '.join(parts) or 'no task of the run languages'}")
    return {"tasks": tasks, "benchmarks": benchmarks, "rows": rows}


def benchmark_markdown(bench: dict[str, Any]) -> str:
    """The results.md section: per row, each benchmark's old and new averages and the mean over benchmarks."""
    names = sorted(bench["benchmarks"])
    header = ["row", *[f"{b} ({role})" for b in names for role in ("old", "new")], "all (old)", "all (new)"]
    lines = [
        "## lm-eval rows (`--benchmark`)",
        "",
        f"Tasks: {', '.join(bench['tasks'])}; a benchmark's old / new value is the mean over the run's old / new "
        "languages that have a task `<benchmark>_<language>`.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for row, summary in bench["rows"].items():
        avg = summary["avg"]
        cells = [f"{avg[role][b]:.4f}" if b in avg[role] else "–" for b in [*names, "all"] for role in ("old", "new")]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines + [""])
