"""Render evaluation results as a Markdown table and PNG figures (the papers' Figures 1, 3 and 4).

Inputs are `moe-lpr eval` results files (one method each: the `"method"` key, else the file stem) and the
demo's combined `results.json` (`{"languages": {...}, "methods": {name: <eval results>}}`). Outputs in DIR:

- `results.md`: perplexity and bits-per-byte tables, methods × languages, old/new averages and their change
  against the base (the method named `base`, else the first); routing and review-data tables when present;
- `old_vs_new.png`: average old- vs new-language bits per byte, one point per method (Figure 1);
- `router_expert0.png`: router probability of the frozen expert 0 per layer, old vs new tokens (Figure 3);
- `review_data.png`: bits per byte against the amount of review data, from runs with a `"review_docs"`
  number (Figure 4), drawn when at least two such runs are given.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from moelpr.errors import UserError

ROLES = ("old", "new")


@dataclass
class MethodResult:
    """One method's evaluation: per-language ppl/bpb, old/new languages, optional routing and review size."""

    name: str
    ppl: dict[str, float]
    bpb: dict[str, float]
    languages: dict[str, list[str]]
    routing: dict[str, dict] = field(default_factory=dict)
    review_docs: float | None = None
    source: str = ""

    def average(self, metric: str, role: str) -> float | None:
        """Mean of `metric` ('ppl' | 'bpb') over the role's languages that have a value."""
        values = [getattr(self, metric)[lang] for lang in self.languages.get(role, []) if lang in getattr(self, metric)]
        return sum(values) / len(values) if values else None

    def expert0_prob(self, role: str) -> list[float] | None:
        """Router probability of expert 0 per MoE layer, averaged over the role's languages (None: no data)."""
        rows = [self.routing[lang]["mean_prob"] for lang in self.languages.get(role, []) if lang in self.routing]
        if not rows:
            return None
        return [sum(row[layer][0] for row in rows) / len(rows) for layer in range(len(rows[0]))]

    def routing_layers(self) -> list[int]:
        first = next(iter(self.routing.values()), {})
        return list(first.get("layers") or range(len(first.get("mean_prob", []))))


def _require(obj: Mapping, key: str, where: str, kind: type | tuple = dict):
    if not isinstance(obj, Mapping) or key not in obj:
        raise UserError(f"{where}: missing key {key!r}; expected `moe-lpr eval` results or a demo results.json")
    value = obj[key]
    if not isinstance(value, kind):
        raise UserError(
            f"{where}: key {key!r} should be a {getattr(kind, '__name__', 'mapping')}, got {type(value).__name__}"
        )
    return value


def _method(name: str, obj: Mapping, where: str, languages: Mapping | None) -> MethodResult:
    ppl = _require(obj, "ppl", where)
    bpb = _require(obj, "bpb", where)
    langs = obj.get("languages") or languages
    if not langs:
        _require(obj, "languages", where)
    if not isinstance(langs, Mapping) or not all(isinstance(langs.get(r, []), list) for r in ROLES):
        raise UserError(f'{where}: key \'languages\' should be {{"old": [...], "new": [...]}}')
    for metric, values in (("ppl", ppl), ("bpb", bpb)):
        bad = [k for k, v in values.items() if not isinstance(v, (int, float))]
        if bad:
            raise UserError(f"{where}: {metric}[{bad[0]!r}] is not a number")
    review = obj.get("review_docs")
    if review is not None and not isinstance(review, (int, float)):
        raise UserError(f"{where}: key 'review_docs' should be a number, got {type(review).__name__}")
    routing = obj.get("routing") or {}
    for lang, stats in routing.items():
        _require(stats, "mean_prob", f"{where} routing[{lang!r}]", list)
    return MethodResult(
        name=str(name),
        ppl=dict(ppl),
        bpb=dict(bpb),
        languages={r: list(langs.get(r, [])) for r in ROLES},
        routing=dict(routing),
        review_docs=review,
        source=where,
    )


def load_results(path: str | os.PathLike) -> list[MethodResult]:
    """The methods in one results file (an eval results file, or a demo results.json with `methods`)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"results file {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not a JSON results file ({err})") from None
    if not isinstance(data, Mapping):
        raise UserError(f"{path}: expected a JSON object with 'ppl' and 'bpb' (or 'methods')")
    if "methods" in data:
        methods = _require(data, "methods", str(path))
        languages = data.get("languages")
        return [_method(name, obj, f"{path} methods[{name!r}]", languages) for name, obj in methods.items()]
    return [_method(data.get("method") or path.stem, data, str(path), None)]


def _unique(methods: list[MethodResult]) -> list[MethodResult]:
    seen: dict[str, int] = {}
    for m in methods:
        seen[m.name] = seen.get(m.name, 0) + 1
        if seen[m.name] > 1:
            m.name = f"{m.name} ({seen[m.name]})"
    return methods


def _fmt(value: float | None, digits: int) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _change(value: float | None, base: float | None) -> str:
    if value is None or base is None or base == 0:
        return "–"
    return f"{100.0 * (value - base) / base:+.1f}%"


def role_languages(methods: Sequence[MethodResult], role: str) -> list[str]:
    return list(dict.fromkeys(lang for m in methods for lang in m.languages[role]))


def _metric_table(methods: Sequence[MethodResult], base: MethodResult, metric: str, digits: int) -> list[str]:
    old, new = role_languages(methods, "old"), role_languages(methods, "new")
    header = ["method", *old, "old avg", "Δ old", *new, "new avg", "Δ new"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for m in methods:
        values = getattr(m, metric)
        cells = [m.name]
        for role, langs in (("old", old), ("new", new)):
            avg = m.average(metric, role)
            cells += [_fmt(values.get(lang), digits) for lang in langs]
            cells += [_fmt(avg, digits), "base" if m is base else _change(avg, base.average(metric, role))]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(methods: Sequence[MethodResult], figures: Sequence[str] = ()) -> str:
    """The report page: metric tables, routing and review-data tables, links to the figures."""
    base = next((m for m in methods if m.name == "base"), methods[0])
    out = [
        "# Evaluation results",
        "",
        f"Held-out perplexity and bits per byte per language: lower is better. Averages are the mean over a "
        f"role's languages; Δ is the change of that average against `{base.name}` (negative = better).",
        "",
    ]
    for title, metric, digits in (("Perplexity", "ppl", 2), ("Bits per byte", "bpb", 4)):
        out += [f"## {title}", "", *_metric_table(methods, base, metric, digits), ""]
    moe = [m for m in methods if m.routing]
    if moe:
        out += [
            "## Routing",
            "",
            "Router probability of the frozen expert 0 (the original FFN), mean over MoE layers and tokens.",
            "",
            "| method | old languages | new languages |",
            "|---|---|---|",
        ]
        for m in moe:
            cells = [(sum(p) / len(p)) if (p := m.expert0_prob(role)) else None for role in ROLES]
            out.append(f"| {m.name} | {_fmt(cells[0], 3)} | {_fmt(cells[1], 3)} |")
        out.append("")
    runs = sorted((m for m in methods if m.review_docs is not None), key=lambda m: m.review_docs)
    if len(runs) >= 2:
        out += ["## Review data", "", "| method | review docs | old avg bpb | new avg bpb |", "|---|---|---|---|"]
        out += [
            f"| {m.name} | {m.review_docs:g} | {_fmt(m.average('bpb', 'old'), 4)} | "
            f"{_fmt(m.average('bpb', 'new'), 4)} |"
            for m in runs
        ]
        out.append("")
    if figures:
        out += ["## Figures", ""] + [f"![{name}]({name})" for name in figures] + [""]
    return "\n".join(out)


def png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    return buf.getvalue()


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def place_labels(fig, ax, points: Mapping[tuple[float, float], list[str]]) -> None:
    """Label each point, top to bottom, nudging a label down (with a leader line) until it overlaps none above."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    placed = []
    for (x, y), names in sorted(points.items(), key=lambda item: -item[0][1]):
        text = ax.annotate(", ".join(names), (x, y), textcoords="offset points", xytext=(6, 5), fontsize=9)
        for _ in range(len(placed) + 1):
            box = text.get_window_extent(renderer).expanded(1.0, 1.1)
            if not any(box.overlaps(other) for other in placed):
                break
            step = box.height * 72 / fig.dpi
            text.xyann = (text.xyann[0] + 4, text.xyann[1] - step)
        if text.xyann != (6, 5):
            ax.annotate(
                "",
                (x, y),
                xytext=text.xyann,
                textcoords="offset points",
                arrowprops={"arrowstyle": "-", "color": "0.6", "lw": 0.6},
            )
        placed.append(text.get_window_extent(renderer))


def figure_old_vs_new(methods: Sequence[MethodResult], groups: Mapping[str, str] | None = None) -> bytes | None:
    """Figure 1: average old- vs new-language bits per byte, one labelled point per method.

    Dashed lines through the base split the plane: a method below and left of both learned the new
    languages and kept the old ones. Methods on the same point share one label.

    Args:
        groups: method → group name; the points are coloured by group, with a legend (default: one colour each).
    """
    points: dict[tuple[float, float], list[str]] = {}
    for m in methods:
        x, y = m.average("bpb", "new"), m.average("bpb", "old")
        if x is not None and y is not None:
            points.setdefault((round(x, 6), round(y, 6)), []).append(m.name)
    if not points:
        return None
    base = next((m for m in methods if m.name == "base"), methods[0])
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.8), layout="constrained")
    bx, by = base.average("bpb", "new"), base.average("bpb", "old")
    if bx is not None and by is not None:
        ax.axvline(bx, color="0.6", ls="--", lw=0.8)
        ax.axhline(by, color="0.6", ls="--", lw=0.8)
    group_names = list(dict.fromkeys((groups or {}).values()))
    for (x, y), names in points.items():
        group = (groups or {}).get(names[0])
        color = f"C{group_names.index(group)}" if group in group_names else None
        ax.scatter([x], [y], s=45, zorder=3, color=color)
    for i, group in enumerate(group_names):
        ax.scatter([], [], s=45, color=f"C{i}", label=group)
    if group_names:
        ax.legend(fontsize=8, loc="upper right")
    ax.margins(0.25)
    place_labels(fig, ax, points)
    ax.annotate(
        "better",
        xy=(0.04, 0.04),
        xytext=(0.2, 0.2),
        xycoords="axes fraction",
        fontsize=9,
        color="0.35",
        arrowprops={"arrowstyle": "->", "color": "0.5"},
    )
    ax.set_xlabel("new languages: mean bits per byte (lower is better)")
    ax.set_ylabel("old languages: mean bits per byte (lower is better)")
    ax.set_title(f"Learning new languages vs keeping old ones (dashed: {base.name})", fontsize=11)
    ax.grid(alpha=0.3)
    data = png(fig)
    plt.close(fig)
    return data


def figure_router_expert0(methods: Sequence[MethodResult]) -> bytes | None:
    """Figure 3: router probability of expert 0 per MoE layer, old vs new tokens, per MoE method."""
    series = [(m, m.expert0_prob("old"), m.expert0_prob("new")) for m in methods if m.routing]
    series = [s for s in series if s[1] is not None or s[2] is not None]
    if not series:
        return None
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7.5, 4.5), layout="constrained")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (m, old, new) in enumerate(series):
        layers = m.routing_layers()
        color = colors[i % len(colors)]
        for probs, style, role in ((old, "-", "old"), (new, "--", "new")):
            if probs is not None:
                ax.plot(layers[: len(probs)], probs, style, marker="o", ms=3, color=color, label=f"{m.name}, {role}")
    ax.set_xlabel("layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("router probability of expert 0\n(the frozen original FFN)")
    ax.set_ylim(0, 1)
    ax.set_title("Routing to the original expert: old (solid) vs new (dashed) language tokens", fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    data = png(fig)
    plt.close(fig)
    return data


def figure_review_data(methods: Sequence[MethodResult]) -> bytes | None:
    """Figure 4: mean bits per byte of old and new languages against the number of review documents."""
    runs = sorted((m for m in methods if m.review_docs is not None), key=lambda m: m.review_docs)
    if len(runs) < 2:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 4), sharex=True, layout="constrained")
    x = [m.review_docs for m in runs]
    for ax, role in zip(axes, ROLES):
        y = [m.average("bpb", role) for m in runs]
        ax.plot(x, [math.nan if v is None else v for v in y], marker="o")
        ax.set_title(f"{role} languages")
        ax.set_xlabel("review documents (stage 2)")
        ax.set_ylabel("mean bits per byte (lower is better)")
        ax.grid(alpha=0.3)
    fig.suptitle("Effect of the amount of review data")
    data = png(fig)
    plt.close(fig)
    return data


def render_report(results: Sequence[str | os.PathLike | MethodResult], output_dir: str | os.PathLike) -> list[Path]:
    """Write `results.md` and the figures that have data into `output_dir`; return the written paths.

    Figures from an earlier report that have no data now are removed, so the directory never shows stale ones.
    """
    from moelpr.utils.atomic import atomic_write_bytes, atomic_write_text

    methods: list[MethodResult] = []
    for item in results:
        methods += [item] if isinstance(item, MethodResult) else load_results(item)
    if not methods:
        raise UserError("no results to report; pass at least one results file")
    methods = _unique(methods)
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out} exists and is not a directory")
    drawn = {
        "old_vs_new.png": figure_old_vs_new(methods),
        "router_expert0.png": figure_router_expert0(methods),
        "review_data.png": figure_review_data(methods),
    }
    written = []
    for name, png in drawn.items():
        if png is None:
            (out / name).unlink(missing_ok=True)
        else:
            atomic_write_bytes(out / name, png)
            written.append(out / name)
    atomic_write_text(out / "results.md", markdown(methods, [p.name for p in written]))
    return [out / "results.md", *written]
