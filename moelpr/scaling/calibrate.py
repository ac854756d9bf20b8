"""Measure the activation memory of our training step on scaled-down replicas, and a process's real peak.

The plan's activations are measured on the real code path (`moelpr.upcycle`, `MoEBlock`, the chunked LM loss
with `compute_logits=False`, HF activation checkpointing), not taken from a generic formula:

- `moelpr.scaling.measure` measures one step's activations phase by phase and what autograd saves.
- `calibrate` measures replicas of the target: hidden, intermediate, head and vocabulary sizes, sequence length
  and LM-loss chunk divided by s (heads, experts, top-k, micro-batch kept; 4 layers: the first, two middle ones,
  the last), at two scales s, and extrapolates each phase figure to s = 1 (`plan.extrapolate`). Keeping the
  proportions keeps the op at which each backward peaks, so the maxima extrapolate like the sums.
- `process_peak` runs real training steps in a fresh process and reads their peak: the RSS on CPU (the check),
  `torch.cuda.max_memory_allocated` on a GPU (bench/gpu_check.sh).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from typing import Callable, Literal

import torch

from moelpr.scaling.measure import StepProfile, measure_step, saved_tensor_bytes
from moelpr.scaling.plan import ActivationProfile, DenseShape, MoELayout, TrainingSetup, extrapolate

Dispatch = Literal["grouped", "loop"]  # the MoE blocks' dispatch paths measured (moelpr.model.dispatch)
REPLICA_LAYERS = 4


# ---- replicas -------------------------------------------------------------------------------------------------


def build_model(
    shape: DenseShape,
    layout: MoELayout,
    stage: int,
    *,
    dtype: torch.dtype,
    dispatch: Dispatch,
    lm_loss_chunk: int,
    seed: int = 0,
):
    """A random upcycled model of `shape` (nothing downloaded), trainable set and losses of `stage`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    import moelpr

    config = AutoConfig.for_model(
        shape.model_type,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        head_dim=shape.head_size,
        vocab_size=shape.vocab_size,
        tie_word_embeddings=shape.tie_word_embeddings,
        max_position_embeddings=4096,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    dense = AutoModelForCausalLM.from_config(config).to(dtype)
    model = moelpr.upcycle(
        dense,
        num_experts=layout.num_experts,
        top_k=layout.top_k,
        aux_loss_coef=0.01 if stage == 1 else 0.0,
        lpr_loss_coef=0.0 if stage == 1 else 0.1,
    )
    model.config.lm_loss_chunk_size = lm_loss_chunk
    moelpr.set_trainable(model, "stage1" if stage == 1 else "stage2")
    model.set_moe_dispatch(dispatch)  # "grouped": the path GPUs train with, forced on CPU
    for block in moelpr.moe_blocks(model):
        block.route = _balanced(block.route, layout.num_experts)
    return model


def _balanced(route: Callable, num_experts: int) -> Callable:
    """The block's routing with its expert choice replaced by a balanced one (token t takes experts t·k + j mod E):
    every expert gets exactly its share of the pairs, as the balance loss aims for, so the measured memory does not
    depend on a random model's routing. The router, softmax and top-k still run (and save what they save)."""

    def balanced_route(hidden_states: torch.Tensor):
        routing = route(hidden_states)
        n, k = routing.experts.shape
        pairs = torch.arange(n * k, device=routing.experts.device).view(n, k)  # (N, k)
        return dataclasses.replace(routing, experts=(pairs % num_experts).to(routing.experts.dtype))

    return balanced_route


def make_batch(micro_batch: int, seq_len: int, vocab: int, seed: int = 1) -> dict[str, torch.Tensor]:
    """A packed block batch as `moelpr.data` collates it; every other sequence is an old-language one."""
    ids = torch.randint(0, vocab, (micro_batch, seq_len), generator=torch.Generator().manual_seed(seed))
    old = (torch.arange(micro_batch) % 2 == 0).long()[:, None].expand(micro_batch, seq_len).contiguous()  # (B, S)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": ids.clone(),
        "lang_mask": old,
        "lang_group": 1 - old,
    }


def replica_scales(shape: DenseShape, setup: TrainingSetup, dispatch: Dispatch, smallest: int = 16) -> tuple[int, int]:
    """Two scales s, 2s with exact replicas: s divides every width, the sequence and the loss chunk; the replica
    keeps head size ≥ 2, sequence ≥ 8 and hidden ≥ `smallest`; the bf16 grouped matmul needs 16-byte rows."""

    def valid(s: int) -> bool:
        dims = (
            shape.hidden_size,
            shape.intermediate_size,
            shape.head_size,
            shape.vocab_size,
            setup.seq_len,
            setup.lm_loss_chunk,
        )
        if any(d % s for d in dims) or shape.head_size // s < 2 or setup.seq_len // s < 8:
            return False
        if shape.hidden_size // s < smallest:
            return False
        if dispatch == "grouped" and setup.precision == "bf16":
            return (shape.hidden_size // s) % 8 == 0 and (shape.intermediate_size // s) % 8 == 0
        return True

    candidates = [2**j for j in range(12) if valid(2**j) and valid(2 ** (j + 1))]
    if not candidates:
        raise ValueError(f"no pair of replica scales for {shape} with {setup}")
    s = candidates[-1]
    return s, 2 * s


def measure_replica(
    shape: DenseShape,
    layout: MoELayout,
    setup: TrainingSetup,
    s: int,
    *,
    dispatch: Dispatch,
    fresh: bool,
    layers: int = REPLICA_LAYERS,
) -> tuple[StepProfile, dict[str, int]]:
    """StepProfile and saved-tensor bytes of the replica at scale `s` (s = 1: the target's widths)."""
    small = shape.scaled(s, layers=layers)
    model = build_model(
        small,
        layout,
        setup.stage,
        dtype=getattr(torch, {"bf16": "bfloat16", "fp32": "float32"}[setup.precision]),
        dispatch=dispatch,
        lm_loss_chunk=setup.lm_loss_chunk // s,
    )
    batch = make_batch(setup.micro_batch, setup.seq_len // s, small.vocab_size)
    step = measure_step(model, batch, checkpointing=setup.checkpointing, fresh=fresh)
    return step, saved_tensor_bytes(model, batch)


@dataclasses.dataclass
class Calibration:
    """The extrapolated activation profile of a target, and what the replicas measured."""

    profile: ActivationProfile
    scales: tuple[int, int]
    replicas: dict[int, StepProfile]
    saved_attention: float  # saved for backward per middle layer, extrapolated to the target
    saved_moe: float


def calibrate(
    shape: DenseShape, layout: MoELayout, setup: TrainingSetup, *, dispatch: Dispatch, fresh: bool = True
) -> Calibration:
    """Measure two replicas of the target and extrapolate their phase figures to the target (see module docstring)."""
    scales = replica_scales(shape, setup, dispatch)
    replicas, saved = {}, {}
    for s in scales:
        replicas[s], saved[s] = measure_replica(shape, layout, setup, s, dispatch=dispatch, fresh=fresh)
    profiles = {s: dataclasses.asdict(step.profile(fresh)) for s, step in replicas.items()}
    fields = {
        name: extrapolate({s: p[name] for s, p in profiles.items()}) for name in profiles[scales[0]] if name != "fresh"
    }
    middle = range(1, REPLICA_LAYERS - 1)

    def saved_at(part: str) -> float:
        return extrapolate({s: sum(saved[s].get(f"layer{i}.{part}", 0) for i in middle) / len(middle) for s in scales})

    return Calibration(
        profile=ActivationProfile(**fields, fresh=fresh),
        scales=scales,
        replicas=replicas,
        saved_attention=saved_at("attention"),
        saved_moe=saved_at("moe"),
    )


# ---- the check: a real step's peak RSS in a fresh process ------------------------------------------------------


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(key + ":"))
    return int(line.split()[1]) * 1024


def _step_worker(spec: dict) -> dict:
    """Build the model, run `steps` full training steps (forward, backward, fused AdamW, zero_grad) and report
    the peak memory above the memory before the model was built (see `process_peak`)."""
    shape, layout = DenseShape(**spec["shape"]), MoELayout(**spec["layout"])
    setup = TrainingSetup(**spec["setup"])
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[setup.precision]
    device = spec.get("device", "cpu")
    cuda = device != "cpu"
    torch.set_num_threads(spec["threads"])

    def run(model, batch, steps: int) -> None:
        model, batch = model.to(device), {k: v.to(device) for k, v in batch.items()}
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)
        if setup.checkpointing:
            model.activation_checkpointing_enable()
        model.train()
        for _ in range(steps):
            model(**batch, compute_logits=False, output_router_logits=True).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    warm = shape.scaled(spec["warmup_scale"], layers=2)  # first-call kernels, threads and allocator arenas
    run(
        build_model(
            warm,
            layout,
            setup.stage,
            dtype=dtype,
            dispatch=spec["dispatch"],
            lm_loss_chunk=setup.lm_loss_chunk // spec["warmup_scale"],
        ),
        make_batch(setup.micro_batch, setup.seq_len // spec["warmup_scale"], warm.vocab_size),
        1,
    )
    now = torch.cuda.memory_allocated if cuda else lambda: _status_bytes("VmRSS")
    baseline = now()
    model = build_model(
        shape, layout, setup.stage, dtype=dtype, dispatch=spec["dispatch"], lm_loss_chunk=setup.lm_loss_chunk
    ).to(device)
    batch = make_batch(setup.micro_batch, setup.seq_len, shape.vocab_size)
    built = now()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS: the model build's transients do not count
    run(model, batch, spec["steps"])
    return {
        "peak": (torch.cuda.max_memory_allocated() if cuda else _status_bytes("VmHWM")) - baseline,
        "built": built - baseline,
        "weights": sum(p.numel() * p.element_size() for p in model.parameters()),
    }


def process_peak(
    shape: DenseShape,
    layout: MoELayout,
    setup: TrainingSetup,
    *,
    dispatch: Dispatch = "loop",
    steps: int = 2,
    threads: int = 1,
    warmup_scale: int = 8,
    device: str = "cpu",
) -> dict:
    """Peak memory of real training steps (single process) in a fresh interpreter, above its memory after imports
    and a warm-up step on a small replica: the RSS on CPU, `torch.cuda.max_memory_allocated` on `device` "cuda".

    glibc is told to serve every allocation above 64 KiB with its own mmap and to trim freed heap, so freed tensors
    leave the RSS at once and VmHWM is the peak of live memory; `ru_maxrss` cannot be used (it keeps the parent's
    RSS across fork and exec). Two steps: the second runs with the AdamW state allocated.
    """
    spec = {
        "shape": dataclasses.asdict(shape),
        "layout": dataclasses.asdict(layout),
        "setup": dataclasses.asdict(setup),
        "dispatch": dispatch,
        "steps": steps,
        "threads": threads,
        "warmup_scale": warmup_scale,
        "device": device,
    }
    env = dict(
        os.environ,
        MALLOC_MMAP_THRESHOLD_="65536",
        MALLOC_TRIM_THRESHOLD_="65536",
        OMP_NUM_THREADS=str(threads),
        TRANSFORMERS_VERBOSITY="error",
    )
    done = subprocess.run(
        [sys.executable, "-m", "moelpr.scaling.calibrate", json.dumps(spec)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"memory check worker failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(_step_worker(json.loads(sys.argv[1]))))
