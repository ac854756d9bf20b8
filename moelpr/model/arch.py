"""Architecture knowledge as data: where the decoder layers are and how their MLP is laid out.

Supported: any decoder-only HF causal LM whose layers hold an `mlp` with either separate
`gate_proj`/`up_proj`/`down_proj` linears (Llama, Mistral, Qwen2/3, Gemma/Gemma2/3, ...) or a fused
`gate_up_proj` + `down_proj` (Phi-3), and an activation module. Both compute `down(act(gate(x)) * up(x))`.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import UserError

# layout name -> attribute names of the projections inside `layer.mlp`
MLP_LAYOUTS: dict[str, dict[str, str]] = {
    "split": {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"},
    "fused": {"gate_up": "gate_up_proj", "down": "down_proj"},
}

# attribute names of the activation module (Phi-3 calls it `activation_fn`)
ACTIVATION_NAMES = ("act_fn", "activation_fn")

_EXPECTED = (
    "expected a decoder-only causal LM whose decoder layers hold an `mlp` with gate_proj/up_proj/down_proj "
    "(or a fused gate_up_proj/down_proj) linear layers and an activation"
)


def decoder(lm: nn.Module) -> nn.Module:
    """The decoder stack (embeddings, layers, final norm; no LM head) of a HF causal LM or a `MoELPRForCausalLM`."""
    stack = lm.get_decoder() if hasattr(lm, "get_decoder") else getattr(lm, "model", None)
    layers = getattr(stack, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise UserError(f"unsupported model {type(lm).__name__}: {_EXPECTED}")
    return stack


def decoder_layers(lm: nn.Module) -> nn.ModuleList:
    """The list of decoder layers of a HF causal LM (`lm.model.layers` for every supported family)."""
    return decoder(lm).layers


def mlp_layout(mlp: nn.Module) -> str | None:
    """'split' or 'fused' when `mlp` is a gated MLP we can upcycle, else None."""
    if activation(mlp) is None:
        return None
    for name, projections in MLP_LAYOUTS.items():
        if all(isinstance(getattr(mlp, attr, None), nn.Linear) for attr in projections.values()):
            return name
    return None


def activation(mlp: nn.Module) -> nn.Module | None:
    """The MLP's activation module, whatever the family calls it."""
    return next((getattr(mlp, name) for name in ACTIVATION_NAMES if hasattr(mlp, name)), None)


def check_supported(lm: nn.Module) -> None:
    """Raise a one-line UserError naming the class unless every decoder layer has an upcyclable MLP."""
    for layer in decoder_layers(lm):
        if mlp_layout(getattr(layer, "mlp", None)) is None:
            raise UserError(f"unsupported model {type(lm).__name__}: {_EXPECTED}")


def gate_up_down(mlp: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The MLP's weights in the stacked-expert layout: gate_up `(2I, H)` rows [gate; up], down `(H, I)`, biases."""
    layout = mlp_layout(mlp)
    if layout == "fused":
        gate_up, down = mlp.gate_up_proj, mlp.down_proj
        return gate_up.weight, down.weight, gate_up.bias, down.bias
    gate, up, down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
    gate_up_weight = torch.cat([gate.weight, up.weight], dim=0)  # (2I, H)
    gate_up_bias = None if gate.bias is None else torch.cat([gate.bias, up.bias], dim=0)
    return gate_up_weight, down.weight, gate_up_bias, down.bias
