"""The MoE-LPR losses as pure functions of explicit tensors (defined in `moelpr.model.losses`, which ships with
every checkpoint; see that module for the equations)."""

from moelpr.model.losses import causal_lm_loss, classifier_loss, load_balancing_loss, lpr_loss

__all__ = ["causal_lm_loss", "classifier_loss", "load_balancing_loss", "lpr_loss"]
