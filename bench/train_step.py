"""Training-step cost of MoE-LPR against dense fine-tuning, on one small random Llama.

Part 1, speed: tokens/s of (a) a stage-1 step (upcycled to `--experts` experts, top-k; new experts + routers
train; balance loss), (b) a stage-2 step (routers only; LPR loss with a `lang_mask`), (c) a dense full
fine-tuning step of the stock HF model. Every step is forward with labels, backward, AdamW step; the three run
interleaved (order rotated each round), and the median over `--steps` rounds after `--warmup` counts.
The stage-1 / dense time ratio is compared with the ratio of training FLOPs per token (formulas below).

Part 2, memory at a Qwen-sized vocabulary (`--mem-vocab 151936`): peak memory of an MoE-LPR stage-1 step with
the chunked LM loss (`compute_logits=False`) against a plain HF step of the same dense model
(`model(input_ids, labels=...)`, full float32 logits). Each variant runs in a fresh subprocess. CPU: peak RSS
(VmHWM, reset after building the model; `ru_maxrss` where that is impossible) above the RSS after building the
model, with `MALLOC_MMAP_THRESHOLD_` fixed so freed tensors go back to the OS; CUDA: `torch.cuda.max_memory_allocated` above the allocation after building the model.

FLOPs per token (training = forward + backward; a matmul with W params costs 2W forward, 2W for the input
gradient, 2W for the weight gradient, so 6W if W trains and 4W if it is frozen but gradients pass through it):
- "6N": 6 × active matmul parameters (stage 1: dense + (k−1) experts per layer + routers) vs 6 × dense ones.
- "careful": dense = 6·(L·(A + F) + V·H) + 6·L·S·H; stage 1 = per layer 4·A (frozen attention; layer 0 gets
  no backward at all: 2·A) + k/E·4·F (expert 0, frozen, chosen by k/E of the tokens when balanced)
  + (k − k/E)·6·F (new experts) + 6·H·E (router), plus 6·V·H for the LM head (frozen, but the chunked loss
  recomputes its forward in backward: 2+2+2), plus the same attention-score term 6·L·S·H (Kaplan et al.'s
  2·n_layer·n_ctx·d forward, ×3). A = attention projection params, F = one FFN's params, E experts, k = top-k.
Embedding lookups count 0.

    python bench/train_step.py                            # CPU float32 / CUDA bfloat16, auto
    python bench/train_step.py --hidden 512 --intermediate 1376 --layers 8 --steps 10
    python bench/train_step.py --skip-memory              # speed only
    python bench/train_step.py --autocast bfloat16        # mixed precision, as the Trainer's bf16=True
    python bench/train_step.py --compare-autocast bfloat16 --skip-memory   # float32 and bf16 autocast, interleaved
    python bench/train_step.py --compile --skip-memory    # also every step with the model under torch.compile
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import moelpr


def build_dense(args, vocab: int, device: str, dtype: torch.dtype) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(args.seq, 128),
        tie_word_embeddings=False,
    )
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).to(device=device, dtype=dtype).train()


def upcycled(dense, args, stage: str):
    model = moelpr.upcycle(copy.deepcopy(dense), num_experts=args.experts, top_k=args.top_k)
    model.config.lm_loss_chunk_size = args.chunk_size
    if stage == "stage2":
        model.config.aux_loss_coef, model.config.lpr_loss_coef = 0.0, 0.1
    moelpr.set_trainable(model, stage)
    return model.train()


def autocast(device: str, amp: str | None):
    """The Trainer's `bf16=True`: float32 master weights, forward under autocast (backward outside it)."""
    return torch.autocast(device, dtype=getattr(torch, amp)) if amp else contextlib.nullcontext()


def make_step(model, batch: dict, moe: bool, device: str, amp: str | None, backend: str | None = None):
    """One training step of `model` (forward with labels, backward, AdamW); `backend`: under torch.compile."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    run = torch.compile(model, backend=backend) if backend else model

    def step():
        with autocast(device, amp):
            out = run(**batch, compute_logits=False) if moe else run(**batch)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def timed(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def flops_per_token(dense, args) -> dict[str, float]:
    """Training FLOPs per token (see the module docstring), from the dense model's weight shapes."""
    layer = dense.model.layers[0]
    attn = sum(
        m.weight.numel()
        for m in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj)
    )
    ffn = sum(m.weight.numel() for m in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj))
    head = dense.lm_head.weight.numel()
    L, H, S, E, k = args.layers, args.hidden, args.seq, args.experts, args.top_k
    scores = 6 * L * S * H
    dense_active = L * (attn + ffn) + head
    moe_active = L * (attn + k * ffn + H * E) + head
    careful_dense = 6 * dense_active + scores
    per_layer = 4 * attn + (k / E) * 4 * ffn + (k - k / E) * 6 * ffn + 6 * H * E
    careful_moe = L * per_layer - 2 * attn + 6 * head + scores
    return {
        "dense_active_params": dense_active,
        "moe_active_params": moe_active,
        "ratio_6n": moe_active / dense_active,
        "ratio_careful": careful_moe / careful_dense,
        "dense_flops": careful_dense,
        "moe_flops": careful_moe,
    }


KINDS = ("stage1", "stage2", "dense")


def precisions(args) -> list[str | None]:
    """Autocast dtypes the speed part times, interleaved: `--autocast`, then `--compare-autocast` if given."""
    return [args.autocast] + ([args.compare_autocast] if args.compare_autocast else [])


def modes(args) -> list[tuple[str | None, bool]]:
    """(autocast dtype, compiled) of every timed variant of each kind: eager, and compiled with `--compile`."""
    return [(amp, compiled) for amp in precisions(args) for compiled in ((False, True) if args.compile else (False,))]


def step_name(kind: str, amp: str | None, compiled: bool = False) -> str:
    return kind + (f"@{amp}" if amp else "") + ("+compile" if compiled else "")


def speed(args, device: str, dtype: torch.dtype) -> dict:
    dense = build_dense(args, args.vocab, device, dtype)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen).to(device)
    lang_mask = (torch.arange(args.batch) % 2 == 0).long()[:, None].expand(args.batch, args.seq).to(device)  # half old
    models = {
        "stage1": upcycled(dense, args, "stage1"),
        "stage2": upcycled(dense, args, "stage2"),
        "dense": dense.requires_grad_(True),
    }
    batches = {
        "stage1": {"input_ids": ids, "labels": ids},
        "dense": {"input_ids": ids, "labels": ids},
        "stage2": {"input_ids": ids, "labels": ids, "lang_mask": lang_mask},
    }
    steps = {
        step_name(kind, amp, compiled): make_step(
            models[kind], batches[kind], kind != "dense", device, amp, args.compile_backend if compiled else None
        )
        for amp, compiled in modes(args)
        for kind in KINDS
    }
    names = list(steps)
    times: dict[str, list[float]] = {n: [] for n in names}
    for it in range(args.warmup + args.steps):
        for name in names[it % len(names) :] + names[: it % len(names)]:
            t = timed(steps[name], device)
            if it >= args.warmup:
                times[name].append(t)
    median = {n: statistics.median(v) for n, v in times.items()}
    tokens = args.batch * args.seq
    result = {
        "median_s": median,
        "tokens_per_s": {n: tokens / median[n] for n in names},
        "spread": {n: (min(v), max(v)) for n, v in times.items()},
    }
    result.update(flops_per_token(dense, args))
    return result


# ---- part 2: memory, one fresh subprocess per variant --------------------------------------------------------


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        line = next(l for l in f if l.startswith(key + ":"))
    return int(line.split()[1]) * 1024  # kB


def _reset_peak_rss() -> bool:
    """Reset the peak RSS (VmHWM) to the current RSS (Linux ≥ 4.0); ru_maxrss cannot be reset and even
    carries the parent's RSS over fork + exec, which would hide a small child's peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_worker(args, device: str, dtype: torch.dtype) -> dict:
    dense = build_dense(args, args.mem_vocab, device, dtype)
    moe = args.memory_worker == "moe"
    model = upcycled(dense, args, "stage1") if moe else dense.requires_grad_(True)
    del dense
    ids = torch.randint(0, args.mem_vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1)).to(
        device
    )
    batch = {"input_ids": ids, "labels": ids}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _status_bytes("VmRSS")
        resettable = _reset_peak_rss()

    def peak() -> int:
        if cuda:
            return torch.cuda.max_memory_allocated() - base
        if resettable:
            return _status_bytes("VmHWM") - base
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base

    with autocast(device, args.autocast):  # forward + backward only first
        out = model(**batch, compute_logits=False) if moe else model(**batch)
    out.loss.backward()
    del out
    fwd_bwd = peak()
    for _ in range(2):  # two full steps: the second runs with the AdamW state already allocated
        with autocast(device, args.autocast):
            out = model(**batch, compute_logits=False) if moe else model(**batch)
        out.loss.backward()
        del out
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
    return {
        "fwd_bwd": fwd_bwd,
        "step": peak(),
        "model": base,
        "params": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in params),
    }


def memory(args) -> dict:
    results = {}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
    passthrough = (
        [
            "--hidden",
            args.hidden,
            "--intermediate",
            args.intermediate,
            "--layers",
            args.layers,
            "--heads",
            args.heads,
            "--kv-heads",
            args.kv_heads,
            "--seq",
            args.seq,
            "--batch",
            args.batch,
            "--experts",
            args.experts,
            "--top-k",
            args.top_k,
            "--mem-vocab",
            args.mem_vocab,
            "--chunk-size",
            args.chunk_size,
            "--device",
            args.device,
        ]
        + (["--dtype", args.dtype] if args.dtype else [])
        + (["--autocast", args.autocast] if args.autocast else [])
    )
    for variant in ("moe", "dense"):
        cmd = [sys.executable, os.path.abspath(__file__), "--memory-worker", variant] + [str(a) for a in passthrough]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"memory worker {variant} failed:\n{done.stderr[-3000:]}")
        results[variant] = json.loads(done.stdout.strip().splitlines()[-1])
    return results


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=688)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8000, help="vocabulary of the speed part")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--steps", type=int, default=7, help="timed rounds (median)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--mem-vocab", type=int, default=151936, help="vocabulary of the memory part (Qwen: 151936)")
    p.add_argument("--chunk-size", type=int, default=512, help="lm_loss_chunk_size: target tokens per LM-loss chunk")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument(
        "--autocast",
        default=None,
        help="forward under autocast to this dtype, float32 weights (the Trainer's bf16=True)",
    )
    p.add_argument(
        "--compare-autocast",
        default=None,
        help="also time every step under autocast to this dtype, interleaved with the others (speed part)",
    )
    p.add_argument("--compile", action="store_true", help="also time every step with the model under torch.compile")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend of --compile")
    p.add_argument("--threads", type=int, default=None, help="intra-op CPU threads (default: torch's)")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--memory-worker", choices=["moe", "dense"], help=argparse.SUPPRESS)
    return p


def main() -> None:
    args = parser().parse_args()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    dtype = getattr(torch, args.dtype or ("bfloat16" if device == "cuda" else "float32"))
    args.device = device
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.memory_worker:
        print(json.dumps(memory_worker(args, device, dtype)))
        return

    where = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"device: {where}; dtype {dtype}; autocast {args.autocast or 'off'}; torch {torch.__version__}; "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    print(
        f"model: Llama hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, "
        f"{args.heads}/{args.kv_heads} heads; batch {args.batch} x seq {args.seq}; MoE {args.experts} experts top-{args.top_k}"
    )
    if not args.skip_speed:
        r = speed(args, device, dtype)
        print(f"\n[speed] vocab {args.vocab}; median of {args.steps} interleaved steps after {args.warmup} warm-up")
        for amp, compiled in modes(args):
            print(f"  autocast {amp or 'off'}{', torch.compile' if compiled else ''}:")
            for kind in KINDS:
                name = step_name(kind, amp, compiled)
                lo, hi = r["spread"][name]
                print(
                    f"  {name:25s} {r['median_s'][name] * 1e3:9.1f} ms/step  {r['tokens_per_s'][name]:10,.0f} tokens/s"
                    f"  (min {lo * 1e3:.1f}, max {hi * 1e3:.1f} ms)"
                )
            t1, t2 = (
                r["median_s"][step_name(k, amp, compiled)] / r["median_s"][step_name("dense", amp, compiled)]
                for k in ("stage1", "stage2")
            )
            print(f"    step time ratio stage1/dense = {t1:.3f}; stage2/dense = {t2:.3f}")
            for name, ratio in (("6N", r["ratio_6n"]), ("careful", r["ratio_careful"])):
                verdict = "PASS" if t1 <= 1.1 * ratio else "FAIL"
                print(
                    f"    target stage1/dense time <= 1.1 x FLOPs ratio ({name}): {t1:.3f} <= {1.1 * ratio:.3f}  {verdict}"
                )
        print(f"  active params: dense {r['dense_active_params']:,}, stage-1 MoE {r['moe_active_params']:,}")
        print(f"  training-FLOPs ratio stage1/dense: 6N {r['ratio_6n']:.3f}; careful {r['ratio_careful']:.3f}")
        if args.compare_autocast:
            base, other = args.autocast, args.compare_autocast
            print(
                "  speed-up of autocast "
                + other
                + " over "
                + (base or "float32")
                + ": "
                + ", ".join(
                    f"{kind} {r['median_s'][step_name(kind, base)] / r['median_s'][step_name(kind, other)]:.2f}x"
                    for kind in KINDS
                )
            )
    if not args.skip_memory:
        m = memory(args)
        unit = "max_memory_allocated" if device == "cuda" else "peak RSS (VmHWM)"
        print(f"\n[memory] vocab {args.mem_vocab}; {unit} above the built model; lm_loss_chunk_size {args.chunk_size}")
        for name, label in (("moe", "MoE-LPR stage 1, chunked loss"), ("dense", "dense HF, full logits")):
            v = m[name]
            print(
                f"  {label:31s} fwd+bwd {v['fwd_bwd'] / 2**20:8.0f} MiB   full step {v['step'] / 2**20:8.0f} MiB"
                f"   (model {v['model'] / 2**20:.0f} MiB, {v['params']:,} params, {v['trainable']:,} trainable)"
            )
        ratio_fb, ratio = m["moe"]["fwd_bwd"] / m["dense"]["fwd_bwd"], m["moe"]["step"] / m["dense"]["step"]
        print(f"  ratio MoE/dense: fwd+bwd {ratio_fb:.3f}; full step {ratio:.3f}")
        print(f"  target full-step ratio <= 0.6: {'PASS' if ratio <= 0.6 else 'FAIL'}")


if __name__ == "__main__":
    main()
