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


def _languages(methods: Sequence[MethodResult], role: str) -> list[str]:
    return list(dict.fromkeys(lang for m in methods for lang in m.languages[role]))


def _metric_table(methods: Sequence[MethodResult], base: MethodResult, metric: str, digits: int) -> list[str]:
    old, new = _languages(methods, "old"), _languages(methods, "new")
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


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    return buf.getvalue()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _place_labels(fig, ax, points: Mapping[tuple[float, float], list[str]]) -> None:
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
    plt = _pyplot()
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
    _place_labels(fig, ax, points)
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
    data = _png(fig)
    plt.close(fig)
    return data


def figure_router_expert0(methods: Sequence[MethodResult]) -> bytes | None:
    """Figure 3: router probability of expert 0 per MoE layer, old vs new tokens, per MoE method."""
    series = [(m, m.expert0_prob("old"), m.expert0_prob("new")) for m in methods if m.routing]
    series = [s for s in series if s[1] is not None or s[2] is not None]
    if not series:
        return None
    plt = _pyplot()
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
    data = _png(fig)
    plt.close(fig)
    return data


def figure_review_data(methods: Sequence[MethodResult]) -> bytes | None:
    """Figure 4: mean bits per byte of old and new languages against the number of review documents."""
    runs = sorted((m for m in methods if m.review_docs is not None), key=lambda m: m.review_docs)
    if len(runs) < 2:
        return None
    plt = _pyplot()
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
    data = _png(fig)
    plt.close(fig)
    return data


def figure_router_layers(
    methods: Sequence[MethodResult], ceilings: Mapping[str, Sequence[float]] | None = None
) -> bytes | None:
    """Figure 3 extended: expert 0's router probability per MoE layer and per language, one panel per method.

    Old languages solid (circles), new dashed (triangles), one colour per language in every panel; the mean
    over the old languages is written at each layer, as the number the LPR loss pushes towards 1.

    Args:
        ceilings: method → per layer, the highest mean old-language probability any router of this form could
            reach on that method's inputs (moelpr.demo.probes), drawn as a black dotted line.
    """
    series = [m for m in methods if m.routing]
    if not series:
        return None
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    langs = [lang for role in ROLES for lang in _languages(series, role)]
    colors = dict(zip(langs, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 2))
    cols = min(len(series), 2)
    rows = math.ceil(len(series) / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(4.2 * cols + 1.4, 3.2 * rows + 0.4), sharey=True, squeeze=False, layout="constrained"
    )
    for ax, m in zip(axes.flat, series):
        layers = m.routing_layers()
        for role, style, marker in (("old", "-", "o"), ("new", "--", "^")):
            for lang in m.languages[role]:
                if lang in m.routing:
                    probs = [row[0] for row in m.routing[lang]["mean_prob"]]
                    ax.plot(
                        layers[: len(probs)],
                        probs,
                        style,
                        marker=marker,
                        ms=4,
                        color=colors[lang],
                        label=f"{lang} ({role})",
                    )
        ceiling = (ceilings or {}).get(m.name)
        if ceiling:
            ax.plot(
                layers[: len(ceiling)],
                ceiling,
                ":",
                color="black",
                lw=1.5,
                label="ceiling: best bias-free linear router (old tokens)",
            )
        old = m.expert0_prob("old")
        for layer, value in zip(layers, old or []):
            ax.annotate(
                f"{value:.2f}",
                (layer, value),
                textcoords="offset points",
                xytext=(0, 7),
                ha="center",
                fontsize=8,
                fontweight="bold",
                bbox={"boxstyle": "round,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.8},
            )
        ax.set_title(m.name, fontsize=10)
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(0, 1.08)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(series) :]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("router probability of expert 0\n(the frozen original FFN)")
    legend = {}
    for ax in axes.flat:
        legend.update(zip(*reversed(ax.get_legend_handles_labels())))
    fig.legend(list(legend.values()), list(legend), loc="outside right center", fontsize=8)
    fig.suptitle(
        "Routing to the original expert per layer: old (solid) vs new (dashed) languages\n"
        "numbers: mean over the old languages (validation pages)",
        fontsize=10,
    )
    data = _png(fig)
    plt.close(fig)
    return data


@dataclass
class SweepPoint:
    """One run of a sweep: its setting (γ, or the review size in tokens), label and mean old/new scores."""

    x: float
    label: str
    old_ppl: float
    new_bpb: float
    default: bool = False  # the row's setting (for γ: the one chosen on validation), circled


def _sweep_refs(ax, refs: Mapping[str, tuple[float, float]], index: int) -> None:
    """Horizontal reference lines (the base dashed, others dotted), named in the legend with their values."""
    for name, values in refs.items():
        ax.axhline(
            values[index], color="0.4", ls="--" if name == "base" else ":", lw=1.0, label=f"{name}: {values[index]:.2f}"
        )


def figure_review_curve(points: Sequence[SweepPoint], refs: Mapping[str, tuple[float, float]]) -> bytes | None:
    """Figure 4: mean old-language perplexity and new-language bits per byte against the review data's size.

    Args:
        points: one per review size (`x` = review tokens, 0 = no review), in any order.
        refs: horizontal reference lines, name → (old ppl, new bpb), e.g. the base and full fine-tuning.
    """
    if len(points) < 2:
        return None
    pts = sorted(points, key=lambda p: p.x)
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True, layout="constrained")
    for ax, index, attr, title in (
        (axes[0], 0, "old_ppl", "old languages: mean perplexity"),
        (axes[1], 1, "new_bpb", "new languages: mean bits per byte"),
    ):
        ys = [getattr(p, attr) for p in pts]
        ax.plot([p.x for p in pts], ys, marker="o", color="C0")
        for p, y in zip(pts, ys):
            ax.annotate(
                f"{y:.2f}" if attr == "new_bpb" else f"{y:.1f}",
                (p.x, y),
                textcoords="offset points",
                xytext=(0, 7),
                ha="center",
                fontsize=8,
                fontweight="bold" if p.default else "normal",
            )
            if p.default:
                ax.scatter([p.x], [y], s=140, facecolors="none", edgecolors="C3", zorder=4, label="the default")
        _sweep_refs(ax, refs, index)
        ax.set_title(title + " (lower is better)", fontsize=10)
        ax.set_xlabel("review (stage-2) tokens, old:new = 1:2")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="center right", framealpha=0.9)
    fig.suptitle("Effect of the amount of review data (validation pages)", fontsize=11)
    data = _png(fig)
    plt.close(fig)
    return data


def figure_gamma_tradeoff(
    points: Sequence[SweepPoint], refs: Mapping[str, tuple[float, float]], tolerance: float = 0.05
) -> bytes | None:
    """The γ trade-off: old-language perplexity change against the base vs new-language bits per byte, per γ.

    Args:
        points: one per LPR coefficient (`x` = γ), joined in γ order.
        refs: reference points, name → (old ppl, new bpb); the one named "base" sets 0 % and the tolerance band.
        tolerance: the old-language perplexity change allowed (the shaded band, e.g. claim 3's 5 %).
    """
    if len(points) < 2 or "base" not in refs:
        return None
    pts = sorted(points, key=lambda p: p.x)
    base_old = refs["base"][0]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5), layout="constrained")
    change = [100 * (p.old_ppl - base_old) / base_old for p in pts]
    xs = [p.new_bpb for p in pts] + [refs["base"][1]]
    ys = change + [0.0, 100 * tolerance, -100 * tolerance]
    pad_x, pad_y = 0.25 * (max(xs) - min(xs) or 0.1), 0.25 * (max(ys) - min(ys) or 1.0)
    xlim, ylim = (min(xs) - pad_x, max(xs) + pad_x), (min(ys) - pad_y, max(ys) + pad_y)
    ax.axhspan(-100 * tolerance, 100 * tolerance, color="C2", alpha=0.12, label=f"within {tolerance:.0%} of the base")
    ax.plot([p.new_bpb for p in pts], change, marker="o", color="C0", label="MoE-LPR stage 2, γ varied")
    for p, y in zip(pts, change):
        if p.default:
            ax.scatter(
                [p.new_bpb],
                [y],
                s=140,
                facecolors="none",
                edgecolors="C3",
                zorder=4,
                label="the γ chosen on validation",
            )
    for i, (name, (old, bpb)) in enumerate(refs.items()):
        y = 100 * (old - base_old) / base_old
        label = f"{name} ({y:+.1f}%, {bpb:.2f} bpb)"
        inside = xlim[0] <= bpb <= xlim[1] and ylim[0] <= y <= ylim[1]
        if not inside:  # far references (full fine-tuning) would squash the curve: an arrow at the edge instead
            edge = (min(max(bpb, xlim[0]), xlim[1]), min(max(y, ylim[0]), ylim[1]))
            ax.annotate(
                f"{label}, off the chart",
                edge,
                xytext=(0.5 * (edge[0] + xlim[1]), 0.9 * ylim[1]),
                fontsize=8,
                color=f"C{i + 4}",
                arrowprops={"arrowstyle": "->", "color": f"C{i + 4}"},
            )
            label += " (off the chart)"
        ax.scatter([bpb], [y], marker="s", color=f"C{i + 4}", zorder=3, label=label)
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    ax.axhline(0, color="0.5", lw=0.8)
    ax.set_xlabel("new languages: mean bits per byte (lower is better)")
    ax.set_ylabel("old languages: mean perplexity change against the base (%)")
    ax.set_title("The LPR trade-off as γ varies (validation pages)", fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    _place_labels(fig, ax, {(p.new_bpb, y): [f"{p.label}: {y:+.1f}%"] for p, y in zip(pts, change)})
    data = _png(fig)
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
