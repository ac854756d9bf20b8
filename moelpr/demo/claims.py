"""The paper's claims, checked against the demo's own numbers and written out plainly (reproduced or not).

Criteria (fixed before any run; never adjusted to a result):
1. Full fine-tuning gains on the new languages: its mean new-language perplexity is below the base's.
2. Full fine-tuning loses on the old languages: its mean old-language perplexity is above the base's.
3. MoE-LPR keeps the old languages: its mean old-language perplexity is within 5 % of the base's.
4. MoE-LPR gains on the new languages close to full fine-tuning: its drop of mean new-language bits per byte
   (from the base) is at least 80 % of full fine-tuning's drop. Bits per byte, not perplexity, because the
   perplexity average is dominated by whichever language the base knows least.
5. LayerMoE matches MoE-LPR with fewer new experts (LayerMoE's claim): its mean old-language perplexity is at
   most 5 % above MoE-LPR's and its drop of mean new-language bits per byte at least 90 % of MoE-LPR's.
6. MoE-LPR is the best of the trained rows on old and new together (the paper's "Avg" column, Tables 1 and 2):
   its score, the mean of its old-language and new-language mean bits per byte, is strictly lower than that of
   every other trained row present (`COMPETITORS`: the baselines, the one-stage MoE, LoRAMoE and the ablations;
   not LayerMoE, which claim 5 compares with MoE-LPR). Fixed before the first run that reports it.
"""

from __future__ import annotations

from typing import Any

from moelpr.demo.plans import METHODS

OLD_TOLERANCE = 0.05
CLOSE_SHARE = 0.80
MATCH_SHARE = 0.90
COMPETITORS = tuple(m for m in METHODS if m not in ("base", "moe_lpr", "layermoe"))  # every other trained row


def _avg(results: dict[str, Any], method: str, metric: str, role: str) -> float:
    return results["methods"][method]["avg"][role][metric]


def together(results: dict[str, Any], method: str) -> float:
    """Claim 6's score: the mean of the old-language and the new-language mean bits per byte (lower is better)."""
    return (_avg(results, method, "bpb", "old") + _avg(results, method, "bpb", "new")) / 2


def check_claims(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One record per claim: `claim`, `reproduced` (bool) and `evidence` (the numbers, as a sentence)."""
    base_old, base_new = _avg(results, "base", "ppl", "old"), _avg(results, "base", "ppl", "new")
    full_old, full_new = _avg(results, "full", "ppl", "old"), _avg(results, "full", "ppl", "new")
    lpr_old = _avg(results, "moe_lpr", "ppl", "old")
    drop_full = _avg(results, "base", "bpb", "new") - _avg(results, "full", "bpb", "new")
    drop_lpr = _avg(results, "base", "bpb", "new") - _avg(results, "moe_lpr", "bpb", "new")
    share = drop_lpr / drop_full if drop_full > 0 else float("nan")
    layer_old = _avg(results, "layermoe", "ppl", "old")
    drop_layer = _avg(results, "base", "bpb", "new") - _avg(results, "layermoe", "bpb", "new")
    layer_share = drop_layer / drop_lpr if drop_lpr > 0 else float("nan")

    rivals = {name: together(results, name) for name in COMPETITORS if name in results["methods"]}
    lpr_score = together(results, "moe_lpr")
    best_rival = min(rivals, key=rivals.get) if rivals else None

    def pct(value: float, base: float) -> str:
        return f"{100 * (value - base) / base:+.1f}%"

    return [
        {
            "claim": "Full fine-tuning gains on the new languages",
            "reproduced": full_new < base_new,
            "evidence": f"mean new-language ppl {base_new:.2f} (base) → {full_new:.2f} (full), "
            f"{pct(full_new, base_new)}",
        },
        {
            "claim": "Full fine-tuning loses on the old languages",
            "reproduced": full_old > base_old,
            "evidence": f"mean old-language ppl {base_old:.2f} (base) → {full_old:.2f} (full), "
            f"{pct(full_old, base_old)}",
        },
        {
            "claim": f"MoE-LPR keeps old-language perplexity within {OLD_TOLERANCE:.0%} of the base",
            "reproduced": lpr_old <= (1 + OLD_TOLERANCE) * base_old,
            "evidence": f"mean old-language ppl {base_old:.2f} (base) → {lpr_old:.2f} (MoE-LPR), "
            f"{pct(lpr_old, base_old)}",
        },
        {
            "claim": f"MoE-LPR gains on the new languages close to full fine-tuning (≥ {CLOSE_SHARE:.0%} of its gain)",
            "reproduced": drop_full > 0 and drop_lpr >= CLOSE_SHARE * drop_full,
            "evidence": f"drop of mean new-language bits per byte: full {drop_full:.4f}, MoE-LPR {drop_lpr:.4f} "
            f"({share:.0%} of full's)",
        },
        {
            "claim": f"LayerMoE matches MoE-LPR with fewer new experts (old ppl ≤ MoE-LPR's + {OLD_TOLERANCE:.0%}, "
            f"≥ {MATCH_SHARE:.0%} of its new-language gain)",
            "reproduced": layer_old <= (1 + OLD_TOLERANCE) * lpr_old
            and drop_lpr > 0
            and drop_layer >= MATCH_SHARE * drop_lpr,
            "evidence": f"mean old-language ppl {lpr_old:.2f} (MoE-LPR) vs {layer_old:.2f} (LayerMoE), "
            f"{pct(layer_old, lpr_old)}; drop of new-language bits per byte {drop_layer:.4f} "
            f"({layer_share:.0%} of MoE-LPR's)",
        },
        {
            "claim": "MoE-LPR is the best of the trained rows on old and new together (mean of the old and new "
            "mean bits per byte)",
            "reproduced": all(lpr_score < score for score in rivals.values()),
            "evidence": f"MoE-LPR {lpr_score:.4f}; best other row "
            + (f"{best_rival} {rivals[best_rival]:.4f}" if best_rival else "none"),
        },
    ]


def claims_markdown(claims: list[dict[str, Any]]) -> str:
    lines = ["## Does the paper's claim reproduce here?", "", "| claim | reproduced | evidence |", "|---|---|---|"]
    lines += [f"| {c['claim']} | {'**yes**' if c['reproduced'] else '**NO**'} | {c['evidence']} |" for c in claims]
    failed = [c["claim"] for c in claims if not c["reproduced"]]
    lines.append("")
    if failed:
        lines.append(
            "Not reproduced in this run: " + "; ".join(failed) + ". The numbers above are reported as "
            "they came out; nothing was tuned on the held-out text."
        )
    else:
        lines.append("Every claim reproduced in this run.")
    lines.append("")
    return "\n".join(lines)
