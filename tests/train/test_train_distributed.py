"""Two processes (torchrun, CPU/gloo): both ranks end with the same weights, and the logged terms match a
single process seeing the same global batch."""

import json
import os
import sys
import textwrap

from train_helpers import TINY_RECIPES, logged, overrides, torchrun

from moelpr.train import load_recipe, train

SCRIPT = textwrap.dedent("""
    import hashlib, json, sys
    import torch
    from transformers import TrainerCallback
    from moelpr.train import load_recipe, train

    class Fingerprint(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kwargs):
            digest = hashlib.sha256()
            for name, p in sorted(model.state_dict().items()):
                digest.update(name.encode()); digest.update(p.detach().float().numpy().tobytes())
            with open(f"{sys.argv[1]}/rank{args.process_index}.json", "w") as f:
                json.dump({"sha": digest.hexdigest(), "world": args.world_size}, f)

    train(load_recipe(sys.argv[2], sys.argv[3:]), callbacks=[Fingerprint()])
""")


def test_two_processes_agree(world, tmp_path):
    dense, corpora = world
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    args = overrides(model=str(dense), corpora=str(corpora), max_steps=2, per_device_train_batch_size=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    command = [
        str(script),
        str(tmp_path),
        str(TINY_RECIPES / "stage1.yaml"),
        "--output_dir",
        str(tmp_path / "ddp"),
        *args,
    ]
    proc = torchrun(command, env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world"] == 2 and ranks[0]["sha"] == ranks[1]["sha"]

    # one process with the same global batch (4) logs the same LM loss at step 1
    single = load_recipe(
        TINY_RECIPES / "stage1.yaml", args + overrides(output_dir=str(tmp_path / "one"), per_device_train_batch_size=4)
    )
    one, two = logged(train(single))[0], logged(tmp_path / "ddp")[0]
    assert abs(one["lm_loss"] - two["lm_loss"]) <= 1e-5 * one["lm_loss"], (one, two)
    assert abs(one["aux_loss"] - two["aux_loss"]) <= 0.05 * one["aux_loss"], (one, two)  # per forward pass
