"""Training: `Recipe` / `load_recipe` (one run's settings), `MoETrainer` (Trainer with the MoE-LPR loss terms)
and `train(recipe)` (setup → train → save for MoE-LPR stage 1 / 2 and the baselines).

Imports are lazy so `import moelpr.train` does not pull in the Trainer.
"""

from moelpr.train.recipe import Recipe, load_recipe


def train(recipe, **kwargs):
    """See `moelpr.train.run.train`."""
    from moelpr.train.run import train as _train

    return _train(recipe, **kwargs)


__all__ = ["Recipe", "load_recipe", "train"]
