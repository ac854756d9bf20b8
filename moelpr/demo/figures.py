"""The demo's validation figures (`moelpr.demo.report` draws them): routing per layer and language against the
best router of its form, the review curve and the γ trade-off. The generic figures `moe-lpr report` draws
(old vs new, routing per MoE layer, review data) are in `moelpr.evaluate.report`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from moelpr.evaluate.report import ROLES, MethodResult, place_labels, png, pyplot, role_languages


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
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    langs = [lang for role in ROLES for lang in role_languages(series, role)]
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
    data = png(fig)
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
    plt = pyplot()
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
    data = png(fig)
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
    plt = pyplot()
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
    place_labels(fig, ax, {(p.new_bpb, y): [f"{p.label}: {y:+.1f}%"] for p, y in zip(pts, change)})
    data = png(fig)
    plt.close(fig)
    return data
