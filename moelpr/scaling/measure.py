"""Measure one training step's activation memory on the real code path, phase by phase.

- `LiveTensorBytes` is a `TorchDispatchMode` that sees every tensor an op returns (forward, backward,
  checkpoint recomputation) and keeps the bytes of the storages alive now and their peak. A storage counts from
  its first op output until it is freed (a `weakref.finalize` on the storage; PyTorch keeps one Python object
  per storage). Parameters, existing gradients and the batch are excluded, so what it sees is activations and
  transients.
- `measure_step` splits that timeline into phases with module hooks (`StepProfile`).
- `saved_tensor_bytes` counts what autograd saves for backward (unique storages, via
  `torch.autograd.graph.saved_tensors_hooks`) per decoder layer, attention part and MoE part.

`moelpr.scaling.calibrate` runs these on scaled-down replicas of a target model.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any, Callable, Iterable, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moelpr.model.arch import decoder_layers
from moelpr.scaling.plan import ActivationProfile


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of the tensor storages created inside the mode that are alive now, their peak and a phase peak."""

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        super().__init__()
        self._known = {t.untyped_storage().data_ptr() for t in exclude}
        self.live = 0
        self.peak = 0
        self.phase_peak = 0

    def _freed(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._known.discard(key)

    def start_phase(self) -> int:
        """Reset the phase peak to the bytes alive now and return them."""
        self.phase_peak = self.live
        return self.live

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and not t.is_meta:
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self._known:
                    self._known.add(key)
                    self.live += storage.nbytes()
                    weakref.finalize(storage, self._freed, key, storage.nbytes())
        self.peak = max(self.peak, self.live)
        self.phase_peak = max(self.phase_peak, self.live)
        return out


@dataclasses.dataclass
class StepProfile:
    """Phase figures of one measured forward+backward, in bytes.

    layer_forward[l]: bytes layer l leaves alive after its forward. layer_backward[l]: the peak during layer l's
    backward minus the bytes alive after the forward of layers 0..l (and minus the gradients of layers > l, when
    measured fresh). before_layers: alive when layer 0 starts; after_layers: what the final norm and the loss
    forward add; loss_backward: the peak of the loss backward above the end of the forward.
    """

    layer_forward: list[int]
    layer_backward: list[int]
    before_layers: int
    after_layers: int
    loss_backward: int
    expert0_pairs: list[int]  # (token, expert) pairs routed to expert 0, per layer

    def profile(self, fresh: bool) -> ActivationProfile:
        fwd, bwd = self.layer_forward, self.layer_backward
        return ActivationProfile(
            forward_first=fwd[0],
            forward_other=sum(fwd[1:]) / (len(fwd) - 1),
            backward_first=bwd[0],
            backward_middle=sum(bwd[1:-1]) / max(len(bwd) - 2, 1),
            backward_top=bwd[-1],
            before_layers=self.before_layers,
            after_layers=self.after_layers,
            loss_backward=self.loss_backward,
            fresh=fresh,
        )


def _first_tensor(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output[0]


def measure_step(
    model, batch: dict[str, torch.Tensor], *, checkpointing: bool = False, fresh: bool = True
) -> StepProfile:
    """Profile one training forward+backward of an upcycled model, as `MoETrainer` calls it.

    `fresh=True`: no `.grad` exists at the start (the first micro-step after `zero_grad(set_to_none=True)`).
    `fresh=False`: a warm-up backward first allocates every `.grad` (the later micro-steps of gradient
    accumulation); new gradients are then transients added into the existing ones.
    """
    layers = decoder_layers(model)
    model.train()
    for p in model.parameters():
        p.grad = None
    if checkpointing:
        model.activation_checkpointing_enable()
    try:
        if not fresh:
            model(**batch, compute_logits=False).loss.backward()
        return _profile(model, layers, batch, fresh)
    finally:
        if checkpointing:
            model.activation_checkpointing_disable()


def _profile(model, layers: Sequence[torch.nn.Module], batch: dict[str, torch.Tensor], fresh: bool) -> StepProfile:
    exclude = [
        *model.parameters(),
        *model.buffers(),
        *batch.values(),
        *(p.grad for p in model.parameters() if p.grad is not None),
    ]
    tracker = LiveTensorBytes(exclude)
    marks: dict[str, int] = {}
    peaks: dict[str, int] = {}
    state = {"phase": "start", "backward": False}

    def enter(phase: str) -> None:
        peaks[state["phase"]] = tracker.phase_peak
        state["phase"] = phase
        marks[phase] = tracker.start_phase()

    def forward_pre(index: int) -> Callable:
        def hook(module, args):
            if not state["backward"]:
                enter(f"forward {index}")

        return hook

    def forward_post(index: int) -> Callable:
        def on_grad(grad: torch.Tensor) -> None:
            state["backward"] = True
            enter(f"backward {index}")

        def hook(module, args, output):
            if state["backward"] or not torch.is_grad_enabled():
                return
            hidden = _first_tensor(output)
            if hidden.requires_grad:
                hidden.register_hook(on_grad)
            enter(f"after {index}")

        return hook

    handles = [
        h
        for i, layer in enumerate(layers)
        for h in (layer.register_forward_pre_hook(forward_pre(i)), layer.register_forward_hook(forward_post(i)))
    ]
    try:
        with tracker:
            enter("embed")
            out = model(**batch, compute_logits=False, output_router_logits=True)
            expert0 = [int((r.experts == 0).sum()) for r in out.routing]
            enter("loss backward")
            out.loss.backward()
            del out
            enter("end")
    finally:
        for handle in handles:
            handle.remove()
    n = len(layers)
    cumulative = [marks[f"after {i}"] for i in range(n)]  # alive after the forward of layers 0..i
    grads = [
        0 if not fresh else sum(p.numel() * p.element_size() for p in layer.parameters() if p.requires_grad)
        for layer in layers
    ]
    return StepProfile(
        layer_forward=[marks[f"after {i}"] - marks[f"forward {i}"] for i in range(n)],
        layer_backward=[peaks[f"backward {i}"] - cumulative[i] - sum(grads[i + 1 :]) for i in range(n)],
        before_layers=marks["forward 0"],
        after_layers=marks["loss backward"] - cumulative[-1],
        loss_backward=peaks["loss backward"] - marks["loss backward"],
        expert0_pairs=expert0,
    )


def saved_tensor_bytes(model, batch: dict[str, torch.Tensor]) -> dict[str, int]:
    """Unique storage bytes autograd saves for backward, by place: "layer{l}.attention", "layer{l}.moe", "outside".

    Parameters are not counted (weights, not activations); a storage is charged to the place that saved it first.
    """
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: set[int] = set()
    totals: dict[str, int] = {}
    where = ["outside"]

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in params and key not in seen:
            seen.add(key)
            totals[where[-1]] = totals.get(where[-1], 0) + storage.nbytes()
        return t

    def push(name: str) -> Callable:
        return lambda module, args: where.append(name)

    def pop(module, args, output) -> None:
        where.pop()

    handles = []
    for i, layer in enumerate(decoder_layers(model)):
        handles += [
            layer.register_forward_pre_hook(push(f"layer{i}.attention")),
            layer.register_forward_hook(pop),
            layer.mlp.register_forward_pre_hook(push(f"layer{i}.moe")),
            layer.mlp.register_forward_hook(pop),
        ]
    model.train()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(**batch, compute_logits=False)
        del out
    finally:
        for handle in handles:
            handle.remove()
    return totals
