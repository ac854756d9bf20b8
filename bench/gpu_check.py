"""One check of what moelpr's training does on the GPU at hand, printed as one table (docs/benchmarks.md §7).

    bash bench/gpu_check.sh                 # on one GPU: under 8 minutes (a time budget skips what would not fit)
    bash bench/gpu_check.sh --cpu           # every part that runs without a GPU, at toy sizes (tests/bench/)
    python bench/gpu_check.py --graph-breaks   # torch.compile's graph breaks per dispatch path and dtype

Rows, each measured in this run (ratios within one run):
- device: the GPU, its compute capability, torch; the dispatch path `auto` trains with there.
- graph breaks: torch.compile (dynamo) on a tiny upcycled model's stage-1 training forward, on that path.
- host syncs per step: `torch.cuda.set_sync_debug_mode("warn")` around every training step of `MoETrainer` that
  does not log (the first excepted), stage 1 and stage 2; 0 expected.
- tiny training: 50 steps of stage 1 (then stage 2) through `moelpr.train.train`, as `moe-lpr train` runs it; the
  logged LM loss must fall.
- MoE block forward+backward, bf16, 8,192 tokens, at Qwen1.5-1.8B's layer (H 2048, I 5504, 6 experts, top-2) and
  Llama-3-8B's (H 4096, I 14336, 4 experts, top-2): ours (`auto`) against the loop reference (the official code's
  dispatch) and transformers' Mixtral block on its fused grouped-mm experts, eager and compiled
  (bench/moe_layer.py). Goals at Qwen's shapes: ≥ 3× the loop, ≥ 1.0× transformers.
- training step: tokens/s of stage 1 and stage 2 against dense full fine-tuning of the same base, a 4-layer Llama
  at Qwen1.5-1.8B's widths and vocabulary (bench/train_step.py), eager and compiled.
- peak memory of that model's stage-1 step (micro-batch 4 × 1024) against docs/scaling.md's plan for it
  (`moelpr.scaling`: activations calibrated on replicas, the "single" engine's rules).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import torch
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))  # moe_layer.py, train_step.py

import moe_layer  # noqa: E402
import train_step  # noqa: E402

BLOCKS = {  # name: (hidden, intermediate, experts): the GPU shapes, and the toy ones of --cpu
    "gpu": {"Qwen1.5-1.8B layer": (2048, 5504, 6), "Llama-3-8B layer": (4096, 14336, 4)},
    "cpu": {"toy layer A": (64, 128, 6), "toy layer B": (128, 256, 4)},
}
SIZES = {  # the training-step model, and the block bench's tokens
    "gpu": dict(hidden=2048, intermediate=5504, layers=4, heads=16, vocab=151936, seq=1024, batch=4, tokens=8192),
    "cpu": dict(hidden=64, intermediate=128, layers=2, heads=4, vocab=512, seq=64, batch=2, tokens=256),
}
MEMORY = {  # the memory model: the training-step one on a GPU; on CPU one large enough for the RSS to mean something
    "gpu": SIZES["gpu"],
    "cpu": dict(hidden=256, intermediate=704, layers=4, heads=8, vocab=8192, seq=256, batch=2),
}
EXPERTS, TOP_K = 6, 2  # the training-step model: Qwen1.5-1.8B's MoE-LPR layout
HEADER = "| check | setting | measured | target | verdict |\n|---|---|---|---|---|"


class Table:
    """The one table: each row printed as soon as it is measured (a run cut short still shows its rows)."""

    def __init__(self, budget: float):
        self.start, self.budget, self.rows = time.perf_counter(), budget, []
        self.out = sys.stdout  # the parts' own output goes to stderr (`quiet`): stdout is the table
        print(HEADER, file=self.out, flush=True)

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.start)

    def row(self, check: str, setting: str, measured: str, target: str = "", verdict: str = "") -> None:
        self.rows.append((check, setting, measured, target, verdict))
        print(f"| {check} | {setting} | {measured} | {target} | {verdict} |", file=self.out, flush=True)


def quiet():
    """What a part prints (the Trainer's logs, parameter summaries) goes to stderr."""
    return contextlib.redirect_stdout(sys.stderr)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


# ---- device ----------------------------------------------------------------------------------------------------


def device_row(table: Table, device: str) -> None:
    from moelpr.model.dispatch import choose_path
    from moelpr.model.grouped import triton_kernel_available

    if device == "cuda":
        capability = torch.cuda.get_device_capability()
        name = f"{torch.cuda.get_device_name()}, compute capability {capability[0]}.{capability[1]}"
    else:
        capability, name = None, f"CPU ({os.cpu_count()} cores), no GPU"
    path = choose_path(training=True, cuda_capability=capability, grouped_fits=True, triton=triton_kernel_available)
    table.row("device", name, f"torch {torch.__version__}; `auto` trains with the {path} path")


# ---- graph breaks -----------------------------------------------------------------------------------------------


def tiny_moe(device: str, dtype: torch.dtype, dispatch: str = "auto", layers: int = 2):
    """A random 2-layer Llama (hidden 64) upcycled to 4 experts, top-2, stage-1 trainable set."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import moelpr

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = moelpr.upcycle(LlamaForCausalLM(config), num_experts=4, top_k=2, moe_dispatch=dispatch)
    moelpr.set_trainable(model, "stage1")
    return model.to(device, dtype).train()


def graph_breaks(model, training: bool) -> tuple[int, int, Counter]:
    """(graphs, breaks, reasons → count) of torch.compile's trace of one forward (with labels when `training`)."""
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0)).to(model.device)
    torch._dynamo.reset()
    with torch.set_grad_enabled(training), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        explained = torch._dynamo.explain(model)(input_ids=ids, labels=ids if training else None)
    reasons = Counter(b.reason.splitlines()[0].strip()[:90] for b in explained.break_reasons)
    return explained.graph_count, explained.graph_break_count, reasons


def graph_break_row(table: Table, device: str, dtype: torch.dtype) -> None:
    graphs, breaks, reasons = graph_breaks(tiny_moe(device, dtype), training=True)
    why = "; ".join(f"{n}× {r}" for r, n in reasons.items()) or "none"
    table.row(
        "torch.compile graph breaks",
        f"tiny 2-layer MoE, stage-1 training forward, {str(dtype).removeprefix('torch.')}, `auto` path",
        f"{graphs} graph(s), {breaks} break(s): {why}",
        "0 on the grouped path (bf16)",
        verdict(breaks == 0) if device == "cuda" else "(CPU: the loop path breaks by design)",
    )


def graph_break_table() -> None:
    """torch.compile's graph breaks on CPU for each dispatch path and dtype, eval and training forwards."""
    print("| dispatch | dtype | forward | graphs | breaks | reasons |\n|---|---|---|---|---|---|")
    for dispatch in ("loop", "grouped"):
        for dtype in (torch.float32, torch.bfloat16):
            for training in (False, True):
                graphs, breaks, reasons = graph_breaks(tiny_moe("cpu", dtype, dispatch), training)
                why = "; ".join(f"{n}× {r}" for r, n in reasons.items()) or "—"
                kind = "training (labels)" if training else "eval"
                print(f"| {dispatch} | {str(dtype).removeprefix('torch.')} | {kind} | {graphs} | {breaks} | {why} |")


# ---- tiny training: loss, host syncs ----------------------------------------------------------------------------


class SyncCounter(TrainerCallback):
    """Counts host syncs in each training step that does not log (the first excepted).

    CUDA's sync debug mode warns at every synchronising call (a device-to-host copy, `.item()`, a blocking copy);
    the warnings of one step are recorded and counted, with where they were raised."""

    def __init__(self):
        self.per_step: list[int] = []
        self.sites: Counter = Counter()
        self._catch = None

    def on_step_begin(self, args, state, control, **kwargs):
        step = state.global_step + 1  # the step about to run
        if not torch.cuda.is_available() or step == 1 or step % max(args.logging_steps, 1) == 0:
            return
        self._catch = warnings.catch_warnings(record=True)
        self._records = self._catch.__enter__()
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")

    def on_step_end(self, args, state, control, **kwargs):
        if self._catch is None:
            return
        torch.cuda.set_sync_debug_mode(0)
        self._catch.__exit__(None, None, None)
        self._catch = None
        syncs = [w for w in self._records if "synchroniz" in str(w.message)]
        self.per_step.append(len(syncs))
        self.sites.update(f"{Path(w.filename).name}:{w.lineno}" for w in syncs)


def tiny_world(root: Path) -> tuple[Path, Path]:
    """A word-level tokenizer and a random 2-layer Llama saved in `root/dense`, and corpora.yaml: one new language
    with learnable structure (each next word follows from the last with a little noise), and one old one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(96)]
    vocab = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3, **{w: i + 4 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    LlamaForCausalLM(config).save_pretrained(root / "dense")
    tokenizer.save_pretrained(root / "dense")
    rng = random.Random(0)
    entries = []
    for name, role, step in (("new", "new", 7), ("old", "old", 11)):
        docs = []
        for _ in range(300):
            w = rng.randrange(48)
            doc = []
            for _ in range(40):
                doc.append(words[w + (48 if role == "new" else 0)])
                w = (w * step + 3 + (rng.random() < 0.1)) % 48
            docs.append(json.dumps({"text": " ".join(doc)}))
        (root / f"{name}.jsonl").write_text("\n".join(docs) + "\n")
        entries.append({"name": name, "path": f"{name}.jsonl", "language": name, "role": role})
    (root / "corpora.yaml").write_text(json.dumps({"corpora": entries}))
    return root / "dense", root / "corpora.yaml"


def tiny_training_rows(table: Table, device: str, steps: int) -> None:
    """Stage 1 (`steps` steps) then stage 2 (`steps` // 2) of the tiny world, syncs counted in both."""
    from moelpr.train import load_recipe, train

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dense, corpora = tiny_world(root)
        common = {
            "corpora": str(corpora),
            "cutoff_len": 64,
            "per_device_train_batch_size": 8,
            "learning_rate": 3e-3,
            "lr_scheduler_type": "constant",
            "logging_steps": max(steps // 5, 1),
            "save_strategy": "no",
            "save_format": "full",
            "report_to": "none",
            "disable_tqdm": True,
            "bf16": device == "cuda",
            "seed": 0,
        }
        counters, logs = {}, {}
        for stage, model, n in ((1, dense, steps), (2, root / "s1", max(steps // 2, 2))):
            counters[stage] = SyncCounter()
            recipe = {"model": str(model), "stage": stage, "max_steps": n, "output_dir": str(root / f"s{stage}")}
            if stage == 1:
                recipe["num_experts"] = 4
            out = train(load_recipe({**common, **recipe}), callbacks=[counters[stage]])
            history = json.loads((out / "train_metrics.json").read_text())["log_history"]
            logs[stage] = [e["lm_loss"] for e in history if "lm_loss" in e]
    first, last = logs[1][0], logs[1][-1]
    setting = f"tiny 2-layer Llama, 4 experts top-2, {'bf16' if device == 'cuda' else 'fp32'}, 8 × 64 tokens"
    table.row(
        "tiny training",
        f"{setting}: {steps} steps of stage 1, then {max(steps // 2, 2)} of stage 2",
        f"stage-1 LM loss {first:.3f} → {last:.3f}; stage 2 {logs[2][0]:.3f} → {logs[2][-1]:.3f}",
        "stage-1 loss falls",
        verdict(last < first),
    )
    if device != "cuda":
        table.row("host syncs per step", "MoETrainer steps that do not log", "not measured: CUDA only")
        return
    for stage, counter in counters.items():
        sites = ", ".join(f"{site} ×{n}" for site, n in counter.sites.most_common(4)) or "none"
        worst = max(counter.per_step, default=0)
        table.row(
            "host syncs per step",
            f"MoETrainer, stage {stage}, {len(counter.per_step)} steps that do not log",
            f"max {worst}, total {sum(counter.per_step)} (at {sites})",
            "0",
            verdict(worst == 0),
        )


# ---- MoE block ----------------------------------------------------------------------------------------------------


def block_rows(table: Table, mode: str, device: str, backend: str, rounds: int) -> None:
    tokens = SIZES[mode]["tokens"]
    for name, (hidden, inter, experts) in BLOCKS[mode].items():
        if table.left() < 60:
            table.row("MoE block fwd+bwd", name, "skipped: time budget")
            continue
        args = moe_layer.parser().parse_args(
            [
                *("--hidden", str(hidden), "--intermediate", str(inter), "--top-k", "2", "--dtype", "bfloat16"),
                *("--variants", "ours,reference,hf,ours+compile,hf+compile", "--compile-backend", backend),
                *("--rounds", str(rounds), "--warmup", "2"),
            ]
        )
        r = moe_layer.run_config(args, tokens, experts, torch.bfloat16, device)
        med = r["median"]
        setting = f"{name}: H {hidden}, I {inter}, {experts} experts top-2, {tokens} tokens, bf16"
        for compiled in (False, True):
            ours = "ours+compile" if compiled else "ours"
            x_ref, x_hf = med["reference"] / med[ours], med["hf+compile" if compiled else "hf"] / med[ours]
            measured = (
                f"ours {med[ours] * 1e3:.2f} ms; {x_ref:.2f}× the loop reference ({med['reference'] * 1e3:.2f} ms, "
                f"eager), {x_hf:.2f}× transformers' grouped_mm experts"
                + (" (both compiled)" if compiled else "")
                + f"; max |Δ| vs ours: loop {r['diff']['reference']:.1e}, transformers {r['diff']['hf']:.1e}"
            )
            goal = mode == "gpu" and name.startswith("Qwen") and not compiled
            table.row(
                "MoE block fwd+bwd" + (f", compiled ({backend})" if compiled else ", eager"),
                setting,
                measured,
                "≥ 3× loop, ≥ 1.0× transformers" if goal else "",
                verdict(x_ref >= 3 and x_hf >= 1.0) if goal else "",
            )


# ---- training step ------------------------------------------------------------------------------------------------


def train_step_args(mode: str, backend: str, steps: int) -> argparse.Namespace:
    s = SIZES[mode]
    return train_step.parser().parse_args(
        [
            *("--hidden", str(s["hidden"]), "--intermediate", str(s["intermediate"]), "--layers", str(s["layers"])),
            *("--heads", str(s["heads"]), "--kv-heads", str(s["heads"]), "--vocab", str(s["vocab"])),
            *("--seq", str(s["seq"]), "--batch", str(s["batch"]), "--experts", str(EXPERTS), "--top-k", str(TOP_K)),
            *("--chunk-size", str(s["seq"]), "--steps", str(steps), "--warmup", "2"),
            *("--compile", "--compile-backend", backend),
        ]
    )


def train_step_rows(table: Table, mode: str, device: str, backend: str, steps: int) -> None:
    if table.left() < 90:
        table.row("training step", "stage 1, stage 2, dense", "skipped: time budget")
        return
    args = train_step_args(mode, backend, steps)
    args.device = device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    r = train_step.speed(args, device, dtype)
    setting = (
        f"{args.layers}-layer Llama, H {args.hidden}, I {args.intermediate}, vocab {args.vocab}; MoE {EXPERTS} "
        f"experts top-2; {args.batch} × {args.seq} tokens, {str(dtype).removeprefix('torch.')}, AdamW"
    )
    for compiled in (False, True):
        tps = {k: r["tokens_per_s"][train_step.step_name(k, None, compiled)] for k in train_step.KINDS}
        t1 = tps["dense"] / tps["stage1"]  # stage-1 step time / dense step time
        table.row(
            "training step" + (f", compiled ({backend})" if compiled else ", eager"),
            setting,
            f"tokens/s: stage 1 {tps['stage1']:,.0f}, stage 2 {tps['stage2']:,.0f}, dense {tps['dense']:,.0f}; "
            f"stage-1/dense time {t1:.2f} (FLOPs ratio {r['ratio_careful']:.2f})",
            "stage-1/dense time ≤ 1.1 × FLOPs ratio" if mode == "gpu" else "(toy sizes: no timing verdict)",
            verdict(t1 <= 1.1 * r["ratio_careful"]) if mode == "gpu" else "",
        )


# ---- memory -----------------------------------------------------------------------------------------------------


def memory_row(table: Table, mode: str, device: str) -> None:
    from moelpr.scaling.calibrate import calibrate, process_peak
    from moelpr.scaling.plan import DenseShape, Engine, MoELayout, TrainingSetup, plan

    if table.left() < 60:
        table.row("peak memory", "stage-1 step", "skipped: time budget")
        return
    s = MEMORY[mode]
    shape = DenseShape(
        hidden_size=s["hidden"],
        intermediate_size=s["intermediate"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["heads"],
        vocab_size=s["vocab"],
        model_type="llama",
    )
    layout = MoELayout(num_experts=EXPERTS, top_k=TOP_K)
    setup = TrainingSetup(stage=1, micro_batch=s["batch"], seq_len=s["seq"], precision="bf16", lm_loss_chunk=s["seq"])
    planned = plan(shape, layout, setup, Engine("single"), calibrate(shape, layout, setup, dispatch="grouped").profile)
    measured = process_peak(shape, layout, setup, dispatch="grouped", device=device, threads=min(os.cpu_count(), 8))
    ratio = measured["peak"] / planned.peak
    what = "torch.cuda.max_memory_allocated" if device == "cuda" else "peak RSS"
    table.row(
        "peak memory",
        f"{shape.num_hidden_layers}-layer Llama, H {shape.hidden_size}, I {shape.intermediate_size}, vocab "
        f"{shape.vocab_size}; MoE {EXPERTS} experts top-2; stage 1, bf16, grouped path, micro-batch "
        f"{setup.micro_batch} × {setup.seq_len}, fused AdamW, one process",
        f"measured {measured['peak'] / 2**30:.2f} GiB ({what}), planned {planned.peak / 2**30:.2f} GiB "
        f"({planned.peak_phase}): {ratio:.3f}× the plan",
        "within ±10 % of the plan",
        verdict(0.9 <= ratio <= 1.1),
    )


# ---- main -------------------------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="toy sizes on CPU (compiled variants with aot_eager)")
    p.add_argument("--graph-breaks", action="store_true", help="only the graph-break table of each path (CPU)")
    p.add_argument("--train-steps", type=int, default=50, help="stage-1 steps of the tiny training")
    p.add_argument("--budget", type=float, default=450, help="seconds; parts that would not fit are skipped")
    args = p.parse_args()
    if args.graph_breaks:
        graph_break_table()
        return
    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no GPU here; run with --cpu for the parts that run without one")
    mode, device = ("cpu", "cpu") if args.cpu else ("gpu", "cuda")
    backend = "aot_eager" if args.cpu else "inductor"  # --cpu: compile paths without inductor's code generation
    rounds, steps = (2, 2) if args.cpu else (10, 5)
    table = Table(args.budget)
    with quiet():
        device_row(table, device)
        graph_break_row(table, device, torch.bfloat16 if device == "cuda" else torch.float32)
        tiny_training_rows(table, device, args.train_steps)
        block_rows(table, mode, device, backend, rounds)
        train_step_rows(table, mode, device, backend, steps)
        memory_row(table, mode, device)
    print(f"\n{time.perf_counter() - table.start:.0f} s; load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
