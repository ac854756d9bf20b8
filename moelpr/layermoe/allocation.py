"""LayerMoE per-layer expert counts from similarities (docs/method.md §4, decision 7 in §3).

    N_l = max(min_experts, ⌈ δ · S_l⁻¹ / Σ_j S_j⁻¹ ⌉)

N_l counts every expert of layer l, the original FFN (expert 0) included. δ is the pre-ceiling scale, so the
realised total Σ N_l exceeds δ (δ = 70 gives 84 on the Llama-3.2-3B worksheet). The quotient is computed
in exact rational arithmetic on the decimal values as written (`Fraction(repr(x))`), so a share that is an
integer on paper is never pushed one up by float error (e.g. ⌈2.0000000000000004⌉ = 3).

S_l is a mean cosine over unaligned token pairs, so it can be zero or negative (a small model whose scripts point
apart in a layer), where 1/S_l means nothing. The paper has no such case (its values are 0.03–0.12). By default
that is an error; `nonpositive="least-similar"` (our extension, not the paper's) scores such a layer as the least
similar layer that has a positive score, so it gets as many experts as that layer, the most of any.
"""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path
from typing import Any, Sequence

from moelpr.errors import UserError


def _exact(value: float) -> Fraction:
    """The decimal the user wrote (shortest repr of the float) as an exact rational."""
    return Fraction(repr(float(value)))


NONPOSITIVE = ("error", "least-similar")


def allocate_experts(
    scores: Sequence[float], budget: float, *, min_experts: int = 2, nonpositive: str = "error"
) -> list[int]:
    """Experts per layer (expert 0 included): fewer where the cross-lingual similarity is higher.

    Args:
        scores: S_l per layer, finite; > 0 unless `nonpositive` says how to treat the others.
        budget: δ, the pre-ceiling scale; at least `min_experts` × layers.
        min_experts: floor per layer (2 = at least one new expert; 1 lets a layer stay dense).
        nonpositive: "error", or "least-similar": a score ≤ 0 counts as the smallest positive one (module doc).

    Returns:
        N_l per layer.
    """
    num_layers = len(scores)
    if num_layers == 0:
        raise UserError("no similarity scores given; the similarity file has no layers")
    if isinstance(min_experts, bool) or not isinstance(min_experts, int) or min_experts < 1:
        raise UserError(f"min_experts must be an integer ≥ 1, got {min_experts!r}")
    if nonpositive not in NONPOSITIVE:
        raise UserError(f"nonpositive must be one of {', '.join(NONPOSITIVE)}, got {nonpositive!r}")
    infinite = [(i, s) for i, s in enumerate(scores) if not math.isfinite(float(s))]
    if infinite:
        raise UserError(f"similarity scores must be finite, layer {infinite[0][0]} has {infinite[0][1]}; recompute it")
    scores = least_similar_floor(scores) if nonpositive == "least-similar" else scores
    bad = [(i, s) for i, s in enumerate(scores) if float(s) <= 0]
    if bad:
        layer, value = bad[0]
        raise UserError(
            f"similarity scores must be > 0 for N_l ∝ 1/S_l, layer {layer} has {value}; pass --nonpositive "
            "least-similar to give such layers the experts of the least similar positive layer"
        )
    if not math.isfinite(float(budget)) or budget < min_experts * num_layers:
        raise UserError(
            f"budget B={budget} is smaller than {min_experts} × {num_layers} layers = {min_experts * num_layers}; "
            f"pass --budget ≥ {min_experts * num_layers}"
        )
    inverse = [1 / _exact(s) for s in scores]
    total = sum(inverse)
    delta = _exact(budget)
    return [max(min_experts, math.ceil(delta * inv / total)) for inv in inverse]


def least_similar_floor(scores: Sequence[float]) -> list[float]:
    """Each score ≤ 0 replaced by the smallest positive score (all of them ≤ 0: unchanged, for the error)."""
    positive = [float(s) for s in scores if float(s) > 0]
    return [float(s) if float(s) > 0 or not positive else min(positive) for s in scores]


def scores_from_similarity(similarity: Any, source: str = "similarity") -> list[float]:
    """S_l per layer from a parsed similarity.json; a malformed one is a `UserError` naming `source`."""
    per_layer = similarity.get("per_layer") if isinstance(similarity, dict) else None
    if not isinstance(per_layer, list) or not per_layer:
        raise UserError(f"{source} is not a similarity file: no non-empty 'per_layer' list; run `moe-lpr similarity`")
    scores = []
    for position, entry in enumerate(per_layer):
        score = entry.get("score") if isinstance(entry, dict) else None
        if isinstance(score, bool) or not isinstance(score, (int, float)):
            raise UserError(f"{source}: per_layer[{position}] has no numeric 'score'; run `moe-lpr similarity` again")
        layer = entry.get("layer", position)
        if layer != position:
            raise UserError(f"{source}: per_layer[{position}] is layer {layer}; layers must be listed 0..L-1 in order")
        scores.append(float(score))
    declared = similarity.get("num_layers", len(scores))
    if declared != len(scores):
        raise UserError(f"{source}: num_layers is {declared} but per_layer lists {len(scores)} layers")
    return scores


def load_similarity(path: str | Path) -> dict[str, Any]:
    """Read and validate a similarity.json written by `moe-lpr similarity`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"similarity file {path} does not exist; run `moe-lpr similarity` first")
    try:
        similarity = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not valid JSON ({err.msg if hasattr(err, 'msg') else err})") from None
    scores_from_similarity(similarity, str(path))
    return similarity


def check_against_model(similarity: dict[str, Any], num_layers: int) -> None:
    """Raise a `UserError` unless the similarity file has one score per decoder layer of the model."""
    found = len(scores_from_similarity(similarity))
    if found != num_layers:
        raise UserError(
            f"the similarity file has {found} layers but the model has {num_layers}; "
            "compute the similarity on this model"
        )


def plot_allocation(scores: Sequence[float], experts: Sequence[int], *, title: str = "LayerMoE allocation") -> bytes:
    """PNG bytes: experts per layer (bars, left axis) and similarity S_l (line, right axis)."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg  # lazy: matplotlib is heavy
    from matplotlib.figure import Figure

    layers = list(range(len(scores)))
    fig = Figure(figsize=(max(6.0, 0.28 * len(layers) + 2.5), 4.0), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    bars = ax.bar(layers, experts, color="#9ecae1", edgecolor="#3182bd", label="experts N_l (incl. original FFN)")
    ax.set_xlabel("layer")
    ax.set_ylabel("experts per layer")
    ax.set_ylim(0, max(experts) + 1)
    ax.set_xticks(layers)
    ax.tick_params(axis="x", labelsize=7 if len(layers) > 20 else 9)
    ax.yaxis.get_major_locator().set_params(integer=True)
    twin = ax.twinx()
    (line,) = twin.plot(layers, scores, color="#d62728", marker="o", markersize=3, label="similarity S_l")
    twin.set_ylabel("similarity S_l (mean cosine)")
    ax.set_title(f"{title}: {sum(experts)} experts, {sum(experts) - len(layers)} new")
    # legend outside the axes, under the x label, so it never hides the curve or the bars
    ax.legend(handles=[bars, line], loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize=8, frameon=False)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()
