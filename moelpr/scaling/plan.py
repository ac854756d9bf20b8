"""Per-GPU memory plan of MoE-LPR training: weights, gradients, optimizer state, activations, engine buffers.

Pure arithmetic (no torch): parameter counts come from the dense config and the expert layout; what each engine
keeps per GPU follows the rules below; activations come from an `ActivationProfile` measured on our own code
(`moelpr.scaling.calibrate`). Ψ = all parameters, Ψt = trainable ones, n = world size. Frozen
parameters (expert 0, attention, norms, embeddings, LM head in both MoE stages) have no gradient and no
optimizer state under any engine.

| engine | weights | gradients | optimizer | buffers |
|---|---|---|---|---|
| `single` / `ddp` | Ψ in the training dtype | Ψt (param dtype) | AdamW m, v: 2Ψt in the param dtype, no master | DDP: gradient buckets, a second copy of the Ψt gradients |
| `zero2` | 2Ψ (bf16, replicated) | 2Ψt/n (bf16 partition) | fp32 master 4Ψt/n + m, v 8Ψt/n | backward: reduce buckets 2·reduce_bucket_size (×2 with overlap_comm); step: bf16 + fp32 flat gradient partition 6Ψt/n |
| `zero3` | 2Ψ/n | 2Ψt/n | 4Ψt/n + 8Ψt/n | gathered parameters ≤ min(stage3_max_live_parameters, Ψ) bf16; reduce bucket; step 6·min(sub_group_size, Ψt/n) |
| `fsdp2` | (2Ψ_frozen + 4Ψt)/n | 4Ψt/n (fp32) | m, v 8Ψt/n (the fp32 shards are the master) | backward: two unsharded bf16 decoder layers + one layer's bf16 reduce-scatter input; LM head + final norm unsharded around the loss |

Assumptions, engine by engine (checked against transformers 5, accelerate 1.16 and DeepSpeed 0.19 sources):
- `single` / `ddp` are the HF Trainer without DeepSpeed/FSDP: the model stays in the dtype it was loaded in
  (transformers 5 loads a bf16 checkpoint in bf16), so with `bf16: true` parameters, gradients and AdamW moments
  are all bf16 and there is no fp32 master copy; `precision="fp32"` is the fp32 run. torch DDP keeps its
  gradient buckets next to `.grad` (`gradient_as_bucket_view=False`, the default).
- DeepSpeed bf16 casts the module to bf16 and keeps an fp32 master copy and fp32 AdamW moments for the
  parameters in the optimizer only (the Trainer passes only trainable ones); gradients accumulate in bf16
  (`grad_accum_dtype` unset). ZeRO-3 partitions every parameter, frozen ones included; a gathered parameter is
  released unless reused within `stage3_max_reuse_distance`, so we charge the bound
  `stage3_max_live_parameters` (1e9 in recipes/deepspeed/zero3.json). "auto" buckets resolve as the HF
  integration does (reduce_bucket_size = H²).
- FSDP2 through accelerate (`fsdp_version: 2`, bf16): trainable parameters are upcast to fp32 before sharding,
  frozen ones stay bf16; compute and gradient reduction run in bf16 (`MixedPrecisionPolicy(param_dtype=bf16,
  reduce_dtype=bf16)`); each decoder layer is one unit (resharded after forward), final norm + LM head another
  one that stays unsharded from its forward to its backward (`reshard_after_forward=False`).
- AdamW is the Trainer's default `adamw_torch_fused`: no step temporaries. Gradient clipping and the CUDA
  context, NCCL and cuBLAS workspaces are not modelled (hence the headroom in `fits`).
- Activations, per micro-batch: the measured profile (forward bytes per layer, backward peaks, LM-loss chunk
  peak) — with the single-grouped-call dispatch that GPUs use, it includes the per-layer copy of all experts'
  weights that `F.grouped_mm` saves; with top-k routing every token carries k expert FFN activations.

The peak is the maximum over the phases of one step: the LM-loss backward (every layer's activations alive),
the backward of each decoder layer l (activations of layers ≤ l, gradients of layers > l) and the optimizer
step. With gradient accumulation the gradients of the window stay resident through every micro-step.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, Mapping

Precision = Literal["bf16", "fp32"]
BYTES = {"bf16": 2, "fp32": 4}
ENGINES = ("single", "ddp", "zero2", "zero3", "fsdp2")


@dataclasses.dataclass(frozen=True)
class DenseShape:
    """The dense model's shape, as in its HF config (`model_type` picks the family the calibration builds)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool = False
    head_dim: int | None = None
    attention_bias: bool = False
    model_type: str = "llama"

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | Any) -> "DenseShape":
        """From an HF config object or its dict (`config.json`); Qwen2 has q/k/v biases."""
        get = config.get if isinstance(config, Mapping) else (lambda key, default=None: getattr(config, key, default))
        model_type = get("model_type", "llama")
        bias = get("attention_bias", model_type == "qwen2")
        return cls(
            hidden_size=get("hidden_size"),
            intermediate_size=get("intermediate_size"),
            num_hidden_layers=get("num_hidden_layers"),
            num_attention_heads=get("num_attention_heads"),
            num_key_value_heads=get("num_key_value_heads") or get("num_attention_heads"),
            vocab_size=get("vocab_size"),
            tie_word_embeddings=bool(get("tie_word_embeddings", False)),
            head_dim=get("head_dim"),
            attention_bias=bool(bias),
            model_type=model_type,
        )

    def scaled(self, s: int, layers: int = 3) -> "DenseShape":
        """A replica with every width (hidden, intermediate, head, vocabulary) divided by `s`; heads kept."""
        dims = (self.hidden_size, self.intermediate_size, self.head_size, self.vocab_size)
        if any(d % s for d in dims):
            raise ValueError(f"scale {s} does not divide hidden/intermediate/head/vocab sizes {dims}")
        return dataclasses.replace(
            self,
            hidden_size=self.hidden_size // s,
            intermediate_size=self.intermediate_size // s,
            head_dim=self.head_size // s,
            vocab_size=self.vocab_size // s,
            num_hidden_layers=layers,
        )


@dataclasses.dataclass(frozen=True)
class MoELayout:
    """Experts per MoE layer counting the frozen original expert 0 (every layer upcycled), and top-k."""

    num_experts: int
    top_k: int


@dataclasses.dataclass(frozen=True)
class ParameterCounts:
    """Parameter counts of the upcycled model; `layer_*` are per decoder layer."""

    embedding: int
    lm_head: int
    final_norm: int
    layer_attention: int
    layer_norms: int
    layer_expert: int  # one expert = one dense FFN
    layer_router: int
    layers: int
    num_experts: int

    @property
    def layer_total(self) -> int:
        return self.layer_attention + self.layer_norms + self.num_experts * self.layer_expert + self.layer_router

    @property
    def total(self) -> int:
        return self.embedding + self.lm_head + self.final_norm + self.layers * self.layer_total

    def layer_trainable(self, stage: int) -> int:
        """Stage 1: the new experts and the router; stage 2: the router only."""
        return self.layer_router + ((self.num_experts - 1) * self.layer_expert if stage == 1 else 0)

    def trainable(self, stage: int) -> int:
        return self.layers * self.layer_trainable(stage)


def parameter_counts(shape: DenseShape, layout: MoELayout) -> ParameterCounts:
    """Counts from the config: q/k/v/o (+ q/k/v biases), two RMSNorms, gated FFN experts, a bias-free router."""
    H, I, q, kv = (
        shape.hidden_size,
        shape.intermediate_size,
        shape.num_attention_heads * shape.head_size,
        shape.num_key_value_heads * shape.head_size,
    )
    attention = H * q + 2 * H * kv + q * H + ((q + 2 * kv) if shape.attention_bias else 0)
    return ParameterCounts(
        embedding=shape.vocab_size * H,
        lm_head=0 if shape.tie_word_embeddings else shape.vocab_size * H,
        final_norm=H,
        layer_attention=attention,
        layer_norms=2 * H,
        layer_expert=3 * H * I,
        layer_router=layout.num_experts * H,
        layers=shape.num_hidden_layers,
        num_experts=layout.num_experts,
    )


@dataclasses.dataclass(frozen=True)
class TrainingSetup:
    """One GPU's share of a training run."""

    stage: int  # 1: new experts + routers train; 2: routers only
    micro_batch: int
    seq_len: int
    grad_accum: int = 1
    checkpointing: bool = False
    precision: Precision = "bf16"
    lm_loss_chunk: int = 1024  # MoELPRConfig.lm_loss_chunk_size

    @property
    def tokens(self) -> int:
        return self.micro_batch * self.seq_len


@dataclasses.dataclass(frozen=True)
class Engine:
    """A data-parallel engine and the settings that change its memory (DeepSpeed keys as in its JSON)."""

    name: str
    world_size: int = 1
    reduce_bucket_size: int | None = None  # elements; None = "auto" (H², as transformers' DeepSpeed integration)
    overlap_comm: bool = False
    max_live_parameters: int = 10**9
    sub_group_size: int = 10**9  # ZeRO-3 runs the optimizer step one sub-group of parameters at a time

    def __post_init__(self):
        if self.name not in ENGINES:
            raise ValueError(f"unknown engine {self.name!r}; expected one of {', '.join(ENGINES)}")

    @classmethod
    def from_deepspeed(cls, config: Mapping[str, Any], world_size: int) -> "Engine":
        """From a DeepSpeed JSON config (its `zero_optimization` block; "auto" values stay auto)."""
        zero = config.get("zero_optimization", {})
        stage = zero.get("stage", 0)
        if stage not in (2, 3):
            raise ValueError(f"only ZeRO stages 2 and 3 are planned, got stage {stage}")
        bucket = zero.get("reduce_bucket_size", 500_000_000 if stage == 2 else "auto")
        return cls(
            name=f"zero{stage}",
            world_size=world_size,
            reduce_bucket_size=None if bucket == "auto" else int(bucket),
            overlap_comm=bool(zero.get("overlap_comm", stage == 3)),
            max_live_parameters=int(zero.get("stage3_max_live_parameters", 10**9)),
            sub_group_size=int(zero.get("sub_group_size", 10**9)),
        )


@dataclasses.dataclass(frozen=True)
class ActivationProfile:
    """Measured activation memory of one micro-batch (bytes; see `memory_calibration.StepProfile`).

    `forward_*`: bytes a decoder layer leaves alive after its forward (layer 0 gets no backward through its
    attention, hence its own figure); `backward_*`: the peak of a layer's backward above the forward bytes of the
    layers up to it (and, for `fresh` profiles, above the gradients of the later layers); `top` is the last
    layer, `middle` the others. `fresh`: measured without existing gradients (first micro-step); otherwise
    with every `.grad` allocated (later micro-steps of gradient accumulation).
    """

    forward_first: float
    forward_other: float
    backward_first: float
    backward_middle: float
    backward_top: float
    before_layers: float
    after_layers: float
    loss_backward: float
    fresh: bool = True

    def forward(self, layer: int) -> float:
        return self.forward_first if layer == 0 else self.forward_other

    def backward(self, layer: int, layers: int) -> float:
        if layer == layers - 1:
            return self.backward_top
        return self.backward_first if layer == 0 else self.backward_middle


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Per-GPU bytes. `gradients` is the engine's gradient storage once backward is done; `activations` and
    `buffers` are their values in the peak phase; `peak` is the maximum over the phases of a step (the columns
    need not add up to it: at the activation peak the gradients are not all there yet)."""

    engine: str
    weights: float
    gradients: float
    master: float
    moments: float
    activations: float
    buffers: float
    peak: float
    peak_phase: str
    total_params: int
    trainable_params: int

    @property
    def optimizer(self) -> float:
        return self.master + self.moments

    def fits(self, capacity: float, headroom: float = 0.9) -> bool:
        """True when the peak is within `headroom` of the device (fragmentation, CUDA context, NCCL buffers)."""
        return self.peak <= headroom * capacity


def plan(
    shape: DenseShape, layout: MoELayout, setup: TrainingSetup, engine: Engine, activations: ActivationProfile
) -> MemoryPlan:
    """The per-GPU memory plan of one training step (see the module docstring for the rules)."""
    if setup.stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, got {setup.stage}")
    counts = parameter_counts(shape, layout)
    psi, psi_t, n = counts.total, counts.trainable(setup.stage), engine.world_size
    layer_t = counts.layer_trainable(setup.stage)
    p = BYTES[setup.precision]
    L = counts.layers
    sharded = engine.name in ("zero2", "zero3", "fsdp2")
    if sharded and setup.precision != "bf16":
        raise ValueError(f"{engine.name} is planned for bf16 mixed precision only")
    if not sharded and setup.grad_accum > 1 and activations.fresh:
        raise ValueError(
            "with gradient accumulation every .grad stays alive: plan DDP with a profile measured "
            "with gradients allocated (fresh=False)"
        )
    bucket = engine.reduce_bucket_size if engine.reduce_bucket_size is not None else shape.hidden_size**2

    master = moments = resident_buffers = 0.0
    step_buffers = backward_buffers = loss_buffers = 0.0
    if engine.name in ("single", "ddp"):
        weights, grads, moments = p * psi, p * psi_t, 2 * p * psi_t
        resident_buffers = p * psi_t if engine.name == "ddp" else 0.0
    elif engine.name == "zero2":
        weights, grads, master, moments = 2 * psi, 2 * psi_t / n, 4 * psi_t / n, 8 * psi_t / n
        loss_buffers = backward_buffers = 2 * bucket * (2 if engine.overlap_comm else 1)  # from backward's start
        step_buffers = 6 * psi_t / n
    elif engine.name == "zero3":
        weights, grads, master, moments = 2 * psi / n, 2 * psi_t / n, 4 * psi_t / n, 8 * psi_t / n
        resident_buffers = 2 * bucket
        loss_buffers = backward_buffers = 2 * min(engine.max_live_parameters, psi)
        step_buffers = 6 * min(engine.sub_group_size, psi_t / n)
    else:  # fsdp2
        weights, grads, moments = (2 * (psi - psi_t) + 4 * psi_t) / n, 4 * psi_t / n, 8 * psi_t / n
        layer_unsharded = 2 * counts.layer_total
        # the layer in backward and the prefetched next one, and the layer's bf16 reduce-scatter input
        backward_buffers = 2 * layer_unsharded + 2 * layer_t
        loss_buffers = 2 * (counts.lm_head + counts.final_norm) + layer_unsharded
    static = weights + master + moments + resident_buffers + (grads if sharded else 0.0)

    def dot_grads(done: int) -> float:
        """single/ddp `.grad` bytes once `done` layers have finished their backward."""
        if sharded:
            return 0.0
        return p * layer_t * done if activations.fresh and done < L else grads

    forward = [activations.forward(i) for i in range(L)]
    alive = activations.before_layers + sum(forward) + activations.after_layers + activations.loss_backward
    phases = {"loss backward": (static + dot_grads(0), alive, loss_buffers)}
    cumulative = activations.before_layers
    for layer in range(L):
        cumulative += forward[layer]
        phases[f"backward of layer {layer}"] = (
            static + dot_grads(L - 1 - layer),
            cumulative + activations.backward(layer, L),
            backward_buffers,
        )
    phases["optimizer step"] = (static + dot_grads(L), 0.0, step_buffers)
    name, (base, act, extra) = max(phases.items(), key=lambda item: sum(item[1]))
    return MemoryPlan(
        engine=engine.name,
        weights=weights,
        gradients=grads,
        master=master,
        moments=moments,
        activations=act,
        buffers=resident_buffers + extra,
        peak=base + act + extra,
        peak_phase=name,
        total_params=psi,
        trainable_params=psi_t,
    )


def extrapolate(values: Mapping[int, float]) -> float:
    """The value at scale 1 from replicas at two scales s, assuming y(s) = a/s² + b/s.

    With the tokens per micro-batch divided by s as well, everything proportional to width × tokens (activations,
    LM-loss logits) or to weights (expert-weight copies, gradients) scales as 1/s², per-token constants (router
    probabilities, top-k indices, attention log-sum-exp) as 1/s.
    """
    (s1, y1), (s2, y2) = sorted(values.items())[:2]
    # a/s1² + b/s1 = y1 ; a/s2² + b/s2 = y2
    det = 1 / (s1 * s1 * s2) - 1 / (s2 * s2 * s1)
    a = (y1 / s2 - y2 / s1) / det
    b = (y2 / (s1 * s1) - y1 / (s2 * s2)) / det
    return a + b
