"""The method's settings, defined once: each one's valid values and default, and the checks that enforce them.

`MoELPRConfig` (what a checkpoint records) and the training `Recipe` (what one run asks for) both take their
choices and defaults from here and validate with these functions, so the two can never drift apart. Part of
the model definition that ships with every checkpoint: imports nothing outside this directory.

docs/method.md explains each choice (paper form vs the official code's).
"""

from __future__ import annotations

from typing import Any

from .errors import UserError

CHOICES: dict[str, tuple[str, ...]] = {
    "balance_loss_form": ("mixtral", "paper"),  # official code (≈ k when balanced) / the paper's (÷ k)
    "lpr_loss_form": ("paper", "official"),  # −log G₀ / CE on the softmax probabilities (double softmax)
    "lpr_loss_reduction": ("mean", "sum"),  # over (layer, old token) pairs / over both, per LM target token
    "classifier_pooling": ("sequence", "token"),  # LayerMoE classifier: one decision per sequence / per token
    "expert_init": ("copy", "random"),  # new experts = copies of the original FFN / fresh ("w/o Expert-Copy")
    "moe_dispatch": ("auto", "reference", "loop", "grouped", "triton"),  # how an MoE block runs its experts
}
"""Every string-valued setting: its valid values, the default first."""

DEFAULTS: dict[str, Any] = {
    **{key: values[0] for key, values in CHOICES.items()},
    "num_experts_per_tok": 2,  # top-k (docs/method.md §1)
    "aux_loss_coef": 0.01,  # α, stage 1's balance loss
    "lpr_loss_coef": 0.1,  # γ, stage 2's LPR loss
    "cls_loss_coef": 0.1,  # LayerMoE's classifier cross-entropy, stage 2
}
"""The papers' values. Which loss terms a run uses is the training stage's choice (stage 1: no LPR)."""

COEFFICIENTS = ("aux_loss_coef", "lpr_loss_coef", "cls_loss_coef")


def check_choice(key: str, value: Any) -> None:
    """One-line `UserError` unless `value` is one of `CHOICES[key]`."""
    if value not in CHOICES[key]:
        raise UserError(f"unknown {key} {value!r}; valid: {', '.join(CHOICES[key])}")


def check_coefficient(key: str, value: Any) -> None:
    """One-line `UserError` unless `value` is a number ≥ 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise UserError(f"{key} must be a number ≥ 0, got {value!r}")


def check_positive_int(key: str, value: Any) -> None:
    """One-line `UserError` unless `value` is an integer ≥ 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{key} must be a positive integer, got {value!r}")


def check_settings(settings: Any) -> None:
    """Validate every setting of this module that `settings` (a config or a recipe) has as an attribute."""
    for key in CHOICES:
        if hasattr(settings, key):
            check_choice(key, getattr(settings, key))
    for key in COEFFICIENTS:
        if hasattr(settings, key):
            check_coefficient(key, getattr(settings, key))
