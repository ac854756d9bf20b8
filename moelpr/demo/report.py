"""The demo's report: one printed line per finished row, the sweeps' points, results.json, results.md (claims,
diagnosis, tables, expert budget) and the figures (test: old_vs_new.png; validation: moelpr.demo.figures)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moelpr.demo.plans import EMBEDDING_RUNS, gamma_run, review_run, stage2_steps
from moelpr.demo.settings import DemoSizes


def sweep_points(
    sizes: DemoSizes, mix: dict, evals: dict[str, dict], sweep_evals: dict[str, dict], gamma_choice: tuple[float, str]
) -> dict:
    """The γ trade-off and the review curve on validation, each point with the run it comes from."""
    from moelpr.demo.data import review_name

    def val(name: str) -> dict:
        res = evals[name]["validation"] if name in evals else sweep_evals[name]
        return {k: res[k] for k in ("ppl", "bpb", "avg", "routing") if k in res}

    gamma = [
        {"gamma": g, "run": "moe_review_no_lpr" if g == 0 else gamma_run(g)} for g in sorted({0.0, *sizes.gamma_grid})
    ]
    review = [{"scale": 0.0, "review_tokens": 0, "replay_tokens": 0, "steps": 0, "run": "moe_stage1"}]
    for scale in sorted(sizes.review_scales):
        stats = mix["reviews"][review_name(scale)]
        review.append(
            {
                "scale": scale,
                "review_tokens": stats["tokens"],
                "replay_tokens": stats["replay_tokens"],
                "steps": stage2_steps(stats["tokens"], sizes),
                "run": "moe_lpr" if scale == 1 else review_run(scale),
            }
        )
    embeddings = [{"frozen": part, "run": run} for part, run in EMBEDDING_RUNS.items() if run in sweep_evals]
    for point in gamma + review + embeddings:
        point["validation"] = val(point["run"])
    return {
        "gamma": gamma,
        "review": review,
        "embeddings": embeddings,
        "chosen_gamma": gamma_choice[0],
        "gamma_reason": gamma_choice[1],
    }


def _change(value: float, ref: float | None) -> str:
    return f" ({100 * (value - ref) / ref:+.1f}%)" if ref else ""


def row_line(name: str, res: dict, base: dict | None, seconds: float) -> str:
    """One printed line per finished row: test ppl (change against the base), validation in brackets."""

    def part(role: str) -> str:
        value, val = res["avg"][role]["ppl"], res["validation"]["avg"][role]["ppl"]
        ref = None if base is None or name == "base" else base["avg"][role]["ppl"]
        ref_val = None if base is None or name == "base" else base["validation"]["avg"][role]["ppl"]
        return f"{role} ppl {value:8.2f}{_change(value, ref)} [val {val:.2f}{_change(val, ref_val)}]"

    return f"[demo] {name:<18} {part('old')}   {part('new')}   {seconds:6.1f}s"


def _experts_markdown(experts: dict[str, dict[str, Any]]) -> str:
    lines = [
        "## New-expert budget",
        "",
        "| method | experts per layer (expert 0 included) | new experts | new-expert parameters |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {name} | {e['experts_per_layer']} | {e['new_experts']} | {e['new_expert_params']:,} |"
        for name, e in experts.items()
    ]
    lpr, layer = experts["moe_lpr"]["new_expert_params"], experts["layermoe"]["new_expert_params"]
    lines += [
        "",
        f"LayerMoE trains {layer / lpr:.0%} of MoE-LPR's new-expert parameters "
        "(allocation in layermoe/allocation.png).",
        "",
    ]
    return "\n".join(lines)


ROUTER_ROWS = ("moe_stage1", "moe_review_no_lpr", "moe_lpr", "layermoe")
"""The rows of router_expert0_layers.png (the paper's Figure 3 compares stage 1, w/o LPR and MoE-LPR)."""


def _figures(out: Path, results: dict) -> list[str]:
    """The validation figures: routing per layer and language, the review curve and the γ trade-off."""
    from moelpr.demo.claims import OLD_TOLERANCE
    from moelpr.demo.diagnosis import TRAINS_EMBEDDINGS
    from moelpr.demo.figures import SweepPoint, figure_gamma_tradeoff, figure_review_curve, figure_router_layers
    from moelpr.evaluate.report import figure_old_vs_new, load_results
    from moelpr.utils.atomic import atomic_write_bytes

    methods = {m.name: m for m in load_results(out / "results.json")}
    for m in methods.values():  # the same rows, with their validation figures
        val = results["methods"][m.name]["validation"]
        m.ppl, m.bpb, m.routing = val["ppl"], val["bpb"], val.get("routing") or {}

    def avg(res: dict) -> tuple[float, float]:
        return res["avg"]["old"]["ppl"], res["avg"]["new"]["bpb"]

    refs = {name: avg(results["methods"][name]["validation"]) for name in ("base", "full")}
    sweeps = results["sweeps"]
    gamma = [
        SweepPoint(p["gamma"], f"γ={p['gamma']:g}", *avg(p["validation"]), default=p["gamma"] == sweeps["chosen_gamma"])
        for p in sweeps["gamma"]
    ]
    review = [
        SweepPoint(p["review_tokens"], f"{p['review_tokens']:,}", *avg(p["validation"]), default=p["run"] == "moe_lpr")
        for p in sweeps["review"]
    ]
    ceilings = {
        name: [layer["lpr_only"]["mean_p0_old"] for layer in probes] for name, probes in results["probes"].items()
    }
    test_rows = load_results(out / "results.json")
    groups = {
        m.name: "base"
        if m.name == "base"
        else "trains embeddings + LM head"
        if m.name in TRAINS_EMBEDDINGS
        else "embeddings + LM head frozen"
        for m in test_rows
    }
    atomic_write_bytes(out / "old_vs_new.png", figure_old_vs_new(test_rows, groups=groups))  # test pages
    drawn = {
        "router_expert0_layers.png": figure_router_layers(
            [methods[n] for n in ROUTER_ROWS if n in methods], ceilings=ceilings
        ),
        "review_curve.png": figure_review_curve(review, refs),
        "gamma_tradeoff.png": figure_gamma_tradeoff(gamma, refs, tolerance=OLD_TOLERANCE),
    }
    for name, png in drawn.items():
        if png is not None:
            atomic_write_bytes(out / name, png)
    return [name for name, png in drawn.items() if png is not None]


def maturity_markdown(m: dict[str, Any]) -> str:
    """The base's maturity (`--sizes mature`): how long it trained and its validation curve."""
    stop = (
        f"stopped at the plateau (the last fifth of the stable phase improved the score by less than "
        f"{m['plateau_threshold']:.0%})"
        if m["stopped_at_plateau"]
        else f"reached its most steps before the plateau criterion ({m['plateau_threshold']:.0%}) held"
    )
    lines = [
        "## The base's maturity",
        "",
        f"{m['stable_steps']:,} steps at a constant learning rate, {stop}, then {m['decay_steps']:,} steps decaying "
        f"to zero: {m['tokens']:,} tokens, {m['epochs']:.1f} epochs of its pretraining mix, "
        f"{m['tokens_per_parameter']:.1f} tokens per parameter ({m['parameters']:,} parameters).",
        "",
        "| step | validation bpb, old | new | score (mean) |",
        "|---|---|---|---|",
    ]
    for p in [*m["curve"], {**m["after_decay"], "step": f"{m['after_decay']['step']} (after the decay)"}]:
        lines.append(f"| {p['step']} | {p['old_bpb']:.4f} | {p['new_bpb']:.4f} | {p['score']:.4f} |")
    return "\n".join(lines + [""])


def write_report(out: Path, results: dict, settings: dict, mix: dict, pretrain: dict, timing: dict) -> None:
    from moelpr.demo.benchmark import benchmark_markdown
    from moelpr.demo.claims import check_claims, claims_markdown
    from moelpr.demo.diagnosis import diagnosis_markdown
    from moelpr.evaluate.report import render_report
    from moelpr.utils.atomic import atomic_write_json, atomic_write_text

    results["claims"] = check_claims(results)
    atomic_write_json(out / "results.json", results)
    render_report([out / "results.json"], out)
    body = (out / "results.md").read_text().split("\n", 1)[1]  # drop the report's own title
    figures = _figures(out, results)
    sizes = settings["sizes"]
    total = sum(v for step in timing.values() for v in step.values())
    if settings.get("base"):
        base = (
            f"Base: the pretrained model {settings['base']} ({sizes['num_layers']} layers × {sizes['hidden_size']} "
            f"wide; not trained here), with its tokenizer; training blocks of {sizes['cutoff_len']} tokens"
        )
    else:
        base = (
            f"Base: Llama-style, {sizes['num_layers']} layers × {sizes['hidden_size']} wide, vocabulary "
            f"{sizes['vocab_size']}, context {sizes['cutoff_len']}, pretrained on the old languages plus "
            f"{100 * pretrain['new_share']:.1f}% new-language bytes ({100 * mix['base_new_token_share']:.1f}% of its "
            "tokens) from pages no later run sees"
        )
    source = settings.get("corpus") or "the user's corpora files"
    intro = [
        "# MoE-LPR demo: results",
        "",
        f"Corpus: {source}. Old languages: {', '.join(results['languages']['old'])}; new languages: "
        f"{', '.join(results['languages']['new'])}. {base}; precision {settings['precision']} (training and "
        f"evaluation); seed {settings['seed']}; sizes {settings['preset']}.",
        f"Stage 1 / baselines: {mix['stage1_tokens']:,} new-language tokens; replay {mix['replay_tokens']:,} "
        f"old-language tokens ({100 * mix['replay_tokens'] / max(1, mix['stage1_tokens']):.1f}% of stage 1); review "
        f"{mix['review_tokens']:,} tokens. Evaluation: the first {sizes['eval_tokens_per_language']:,} tokens per "
        "language of the test pages (the tables below) and of the validation pages (where the settings were chosen; "
        "`results.json` → `methods.<m>.validation`, the sweeps). "
        f"Time: {total:.0f} s for the steps run in this invocation or earlier ones (timing.json).",
        "",
        f"MoE-LPR's LPR coefficient (also LayerMoE's and the w/o-Expert-Copy row's): γ = "
        f"{results['sweeps']['chosen_gamma']:g}, {results['sweeps']['gamma_reason']}.",
        "",
        *([maturity_markdown(pretrain["maturity"])] if "maturity" in pretrain else []),
        claims_markdown(results["claims"]),
        diagnosis_markdown(results),
        _experts_markdown(results["experts"]),
        *([benchmark_markdown(results["benchmark"])] if "benchmark" in results else []),
        "## Validation figures",
        "",
        *[f"![{name}]({name})" for name in figures],
        "",
    ]
    atomic_write_text(out / "results.md", "\n".join(intro) + body)
