"""Training: `Recipe` / `load_recipe` (one run's settings), `train(recipe)` (setup → train → save, `run.py`), the
training methods (`methods.py`) and `MoETrainer` (`trainer.py`). Importing this package does not import torch or
the Trainer (`run.py` imports them when a run starts)."""

from moelpr.train.recipe import Recipe, load_recipe
from moelpr.train.run import train

__all__ = ["Recipe", "load_recipe", "train"]
