"""The demo's size presets (`--sizes default|large|quick`), and the record that stops two different runs mixing in one directory.

Why these sizes (docs/demo.md has the measurements): on 2 CPU cores a 4-layer, 128-wide Llama with a 4,096-token
vocabulary trains at a few thousand tokens per second in float32, so the whole comparison (base pretraining, six
trained methods, seven evaluations) fits in 15 minutes. bf16 is used only on CPUs with native bf16 matrix units
(AMX / AVX512-BF16): on AVX2-only CPUs PyTorch emulates bf16 matmuls and they run several times *slower*.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moelpr.errors import UserError

SETTINGS_FILE = "demo_settings.json"


@dataclass(frozen=True, kw_only=True)
class DemoSizes:
    """Model, data and training sizes of one demo run (every method shares the new-language budget).

    docs/demo.md ("How the defaults were chosen") logs the validation runs behind each default.
    """

    # corpus (man pages only): whole pages held out for the test report and for validation (where every
    # setting below was chosen); tokenizer trained on the base's pretraining mix
    max_pages_per_language: int | None = None  # None renders every installed page
    heldout_fraction: float = 0.1  # test
    validation_fraction: float = 0.1
    vocab_size: int = 4096
    # base model (Llama-style), English-centric: pretrained on the old languages plus `base_new_share` of
    # new-language text (share of the pretraining mix's bytes; pages stage 1 never sees)
    hidden_size: int = 128
    num_layers: int = 4
    intermediate_size: int = 384
    num_heads: int = 4
    cutoff_len: int = 128  # training block = the model's context = the evaluation window
    batch_size: int = 16  # blocks per micro-batch; blocks per optimiser step = this × gradient_accumulation
    gradient_accumulation: int = 1
    gradient_checkpointing: bool = False  # recompute activations in backward (real models on a GPU)
    base_new_share: float = 0.03
    base_steps: int = 400  # with base_plateau: the most steps of the stable phase
    base_lr: float = 3e-3
    # a base trained to maturity (moelpr.demo.maturity): at a constant rate until the last fifth of the steps
    # improves the validation score by less than `base_plateau` (evaluated every `base_eval_every` steps), then
    # `base_decay_fraction` × those steps with the rate decaying to 0; None: one cosine schedule of base_steps
    base_plateau: float | None = None
    base_eval_every: int = 250
    base_decay_fraction: float = 0.1
    # new-language data: tokens per new language in the stage-1 mix (documents in file order, last one cut)
    new_tokens_per_language: int = 80_000
    # the comparison
    stage1_steps: int = 120  # MoE stage 1; baselines get stage1_steps + stage2_steps on new data + replay
    lr: float = 1e-3  # full FT, LoRA, LLaMA-Pro and MoE stage 1 alike
    num_experts: int = 4  # counting expert 0, the frozen original FFN
    top_k: int = 2
    lora_rank: int = 8
    llama_pro_blocks: int = 2
    loramoe_experts: int = 8  # the paper: 8 LoRA experts of rank 180 on a 2,048-wide model
    loramoe_rank: int = 12  # 180 / 2,048 of the width
    # stage 2 (review): old-language replay = replay_fraction of the stage-1 tokens, new = 2× that (paper 1:2)
    replay_fraction: float = 0.01
    stage2_epochs: int = 4  # 14 steps, 12 % of stage 1's
    stage2_lr: float = 3e-2  # routers only (0.06 % of the weights)
    stage2_cutoff_len: int | None = None  # stage 2's training block (the paper: 512 against stage 1's 1,024)
    # the LPR coefficients stage 2 is trained with, each from the same stage-1 model: MoE-LPR (and LayerMoE and
    # the w/o-Expert-Copy ablation, which share its stage 2) takes the smallest whose validation old-language ppl
    # is within 5 % of the base's, chosen in the run (`choose_gamma`; the rule of docs/demo.md); one value = fixed
    gamma_grid: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0)
    lpr_loss_reduction: str = "sum"  # the paper's sum over old tokens ("mean": the official code); validation: either
    # LayerMoE (same data, steps and learning rates as MoE-LPR): similarity measured on the base with this many
    # review tokens per language; budget δ of the allocation (expert 0 counted, ≥ 2 × layers); classifiers on
    # the `classifier_top_k` most similar layers (the paper: 7 of 24 layers ≈ 1 of 4)
    similarity_tokens: int = 4000
    layermoe_budget: int = 9
    classifier_top_k: int = 1
    # the review curve on validation data: review mixes of these multiples of the default size, stage 2 run for
    # the same epochs (the γ trade-off figure is the γ grid above, with γ = 0)
    review_scales: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0)
    # evaluation
    eval_tokens_per_language: int = 8000
    eval_batch_size: int = 16
    # whether `--precision auto` takes bf16 on a CPU with native bf16 matmuls: not at the default sizes, where bf16
    # autocast measured slower than float32 (the matmuls are too small to pay for the casts) and moved claim 3's
    # borderline verdict (docs/demo.md, "Measured"); yes at `large`, whose training step it speeds up
    auto_bf16: bool = False


FULL = DemoSizes()
QUICK = DemoSizes(
    max_pages_per_language=24,
    vocab_size=1024,
    hidden_size=64,
    num_layers=2,
    intermediate_size=128,
    num_heads=2,
    cutoff_len=64,
    batch_size=8,
    base_steps=40,
    new_tokens_per_language=4000,
    stage1_steps=12,
    replay_fraction=0.25,
    stage2_epochs=2,
    eval_tokens_per_language=400,
    similarity_tokens=400,
    layermoe_budget=5,
    review_scales=(0.5, 1.0),
    gamma_grid=(0.3, 1.0),
)
"""The CI smoke run: the same pipeline at toy sizes; its numbers show that everything runs, not the paper's claims."""
LARGE = dataclasses.replace(FULL, hidden_size=256, intermediate_size=768, num_layers=6, num_heads=4, auto_bf16=True)
"""About 5x the default's non-embedding parameters: does the gap to the paper shrink with scale? (docs/demo.md)."""
MATURE = dataclasses.replace(FULL, base_steps=6000, base_plateau=0.01)
"""The base-maturity test of reading (c): the default comparison from a base pretrained until its validation
score plateaus (moelpr.demo.maturity; docs/demo.md, "A mature base"); at most about an hour on 2 cores."""
PAPER = DemoSizes(
    vocab_size=0,  # the model's tokenizer
    cutoff_len=1024,
    stage2_cutoff_len=512,
    batch_size=8,
    gradient_accumulation=8,
    gradient_checkpointing=True,
    base_new_share=0.0,
    new_tokens_per_language=0,  # from --tokens
    stage1_steps=0,  # from --tokens
    lr=5e-5,
    num_experts=6,
    top_k=2,
    replay_fraction=0.00575,
    stage2_epochs=1,
    stage2_lr=5e-5,
    similarity_tokens=100_000,
    eval_tokens_per_language=50_000,
    eval_batch_size=8,
    auto_bf16=True,
)
"""The papers' regime for a pretrained model (`--base DIR --sizes paper --tokens N`; moelpr.demo.pretrained)."""
SIZES = {"default": FULL, "large": LARGE, "quick": QUICK, "mature": MATURE, "paper": PAPER}
"""The presets `--sizes` picks from (`--quick` = `--sizes quick`)."""


def gpu_has_bf16() -> bool:
    """True where a CUDA GPU with bf16 support is visible."""
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def cpu_has_native_bf16() -> bool:
    """True where the CPU has bf16 matrix instructions (Linux /proc/cpuinfo flags amx_bf16 or avx512_bf16)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_precision(precision: str, sizes: DemoSizes) -> str:
    """The precision to run: `auto` is bf16 where the sizes ask for it (`auto_bf16`) and the GPU or the CPU has
    native bf16 (`gpu_has_bf16`, `cpu_has_native_bf16`), else fp32."""
    if precision not in ("auto", "fp32", "bf16"):
        raise UserError(f"unknown precision {precision!r}; choose auto, fp32 or bf16")
    if precision == "auto":
        return "bf16" if sizes.auto_bf16 and (gpu_has_bf16() or cpu_has_native_bf16()) else "fp32"
    return precision


def preset_sizes(name: str) -> DemoSizes:
    """The `--sizes` preset of that name; a one-line `UserError` naming the presets otherwise."""
    if name not in SIZES:
        raise UserError(f"unknown --sizes {name!r}; choose one of {', '.join(SIZES)}")
    return SIZES[name]


def settings_record(
    sizes: DemoSizes,
    *,
    preset: str,
    seed: int,
    precision: str,
    languages: dict[str, list[str]],
    corpora: dict[str, str] | None,
    corpus: str | None = None,
    base: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """What makes a run: compared on every rerun in the same output directory.

    Args:
        corpora: the user's corpora files by split (train, validation, heldout), None for a built-in corpus.
        corpus: the built-in corpus (`libreoffice`, `manpages`), None with `corpora`.
        base: the user's pretrained model directory (`--base`), None for the base trained here.
    """
    return {
        "preset": preset,
        "seed": seed,
        "precision": precision,
        "languages": languages,
        "corpus": corpus,
        "corpora": None if corpora is None else {split: os.path.abspath(p) for split, p in corpora.items()},
        "base": None if base is None else os.path.abspath(base),
        "sizes": json.loads(json.dumps(dataclasses.asdict(sizes))),  # tuples as JSON lists, as reread
    }


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            out += _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} → {new!r}"]


def check_or_write_settings(out_dir: Path, record: dict[str, Any], *, overwrite: bool) -> None:
    """Write `demo_settings.json`, or refuse a directory that holds a run made with other settings."""
    from moelpr.utils.atomic import atomic_write_json

    path = out_dir / SETTINGS_FILE
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--output {out_dir} exists and is not a directory; choose another")
    if path.is_file() and not overwrite:
        try:
            previous = json.loads(path.read_text())
        except json.JSONDecodeError:
            raise UserError(f"{path} is not valid JSON; use another --output or --overwrite") from None
        diff = _differences(previous, record)
        if diff:
            shown = "; ".join(diff[:3]) + (f"; +{len(diff) - 3} more" if len(diff) > 3 else "")
            raise UserError(
                f"{out_dir} holds a demo run made with other settings ({shown}); use another --output or --overwrite"
            )
        return
    if not path.is_file() and out_dir.is_dir() and any(out_dir.iterdir()):
        raise UserError(f"{out_dir} is not empty and holds no demo run ({SETTINGS_FILE} missing); use another --output")
    if path.is_file() and overwrite:
        import shutil

        shutil.rmtree(out_dir)  # only a directory that holds a demo run is ever removed
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, record)
