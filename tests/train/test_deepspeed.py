"""DeepSpeed ZeRO-2 and ZeRO-3 through `moe-lpr train` on 2 CPU processes (torchrun, gloo): the shipped
configs reach the weights of one process seeing the same global batch, ZeRO-3 saves the gathered weights in
our checkpoint formats, a run resumed from a ZeRO-3 checkpoint ends where an uninterrupted one does, and
ZeRO-3 trains to the end when one process routes no token to some experts (each MoE block a ZeRO-3 leaf).

The recipe is the tiny stage-1 one without `use_cpu` (the case that used to fail DeepSpeed's batch check).
The first DeepSpeed process group on a machine JIT-compiles DeepSpeed's shared-memory op (cached after).
"""

import json
import os
import shutil
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from train_helpers import REPO, TINY_RECIPES, overrides, starve_experts, torchrun

import moelpr
from moelpr.cli import main
from moelpr.model.layer import MoEBlock
from moelpr.train import load_recipe, train

DEEPSPEED = REPO / "recipes" / "deepspeed"
TOL = 1e-4


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    """recipes/tiny/stage1.yaml without `use_cpu`."""
    spec = yaml.safe_load((TINY_RECIPES / "stage1.yaml").read_text())
    del spec["use_cpu"]
    path = tmp_path_factory.mktemp("ds_recipe") / "stage1.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


# Every run: micro-batch 1, global batch 4. The balance loss is defined per forward pass (docs/method.md), so
# the exact single-process equivalent of 2 processes × GA 2 keeps the micro-batch and accumulates 4.
BATCH = dict(per_device_train_batch_size=1, gradient_accumulation_steps=2)


@pytest.fixture(scope="module")
def single(world, recipe, tmp_path_factory):
    """One process, no DeepSpeed: {steps: output directory} after 2 and 4 steps (full format)."""
    dense, corpora = world
    root = tmp_path_factory.mktemp("ds_single")
    return {
        steps: train(
            load_recipe(
                recipe,
                overrides(
                    model=str(dense),
                    corpora=str(corpora),
                    max_steps=steps,
                    per_device_train_batch_size=1,
                    gradient_accumulation_steps=4,
                    save_format="full",
                    output_dir=str(root / f"s{steps}"),
                ),
            )
        )
        for steps in (2, 4)
    }


def torchrun_train(recipe: Path, world, out: Path, config: str, *args: str, program: str | None = None) -> None:
    """`torchrun --nproc_per_node 2 moe-lpr train RECIPE --deepspeed recipes/deepspeed/CONFIG.json ...`.

    `program`: Python source run instead of `moe-lpr` (it gets the same arguments; tests/ is on its path)."""
    dense, corpora = world
    cli = shutil.which("moe-lpr", path=str(Path(sys.executable).parent)) or shutil.which("moe-lpr")
    path = os.pathsep.join([str(REPO / "tests"), *sys.path])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": path}
    launch = [cli] if program is None else ["--no-python", sys.executable, "-c", program]
    command = [
        *launch,
        "train",
        str(recipe),
        "--deepspeed",
        str(DEEPSPEED / f"{config}.json"),
        "--output_dir",
        str(out),
        *overrides(model=str(dense), corpora=str(corpora)),
        *args,
    ]
    proc = torchrun(command, env, timeout=400)  # a hang fails the test
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def moe_params(out_dir: Path) -> dict[str, torch.Tensor]:
    return dict(moelpr.load_model(out_dir).named_parameters())


def is_new(name: str) -> bool:
    """New experts and routers: what stage 1 trains."""
    return ".mlp.experts." in name or ".mlp.routers." in name


def assert_same_training(got_dir: Path, want_dir: Path, dense_dir: Path) -> None:
    """New experts and routers within TOL of the reference; every other parameter (expert 0 included)
    bit-identical to the dense model (a delta checkpoint takes those from the dense model itself)."""
    got, want, dense = moe_params(got_dir), moe_params(want_dir), moe_params(dense_dir)
    assert got.keys() == want.keys()
    for name, param in got.items():
        if is_new(name):
            assert (param - want[name]).abs().max() <= TOL, name
        else:
            assert torch.equal(param, dense[name.removeprefix("lm.").replace(".mlp.original.", ".mlp.")]), name


def test_zero2_matches_one_process(world, recipe, single, tmp_path):
    torchrun_train(recipe, world, tmp_path / "z2", "zero2", *overrides(max_steps=4, save_format="full", **BATCH))
    assert_same_training(tmp_path / "z2", single[4], world[0])


def test_zero3_saves_gathered_weights_and_resumes(world, recipe, single, tmp_path):
    """ZeRO-3: 2 steps with a checkpoint (delta format: only the gathered MoE weights), then a second
    launch resumes from that checkpoint to step 4 (full format: every gathered weight)."""
    torchrun_train(
        recipe, world, tmp_path / "z3", "zero3", *overrides(max_steps=2, save_strategy="steps", save_steps=2, **BATCH)
    )
    assert moelpr.checkpoint.is_delta_dir(tmp_path / "z3")
    assert_same_training(tmp_path / "z3", single[2], world[0])
    checkpoint = tmp_path / "z3" / "checkpoints" / "checkpoint-2"
    assert (checkpoint / "global_step2").is_dir()  # DeepSpeed's own sharded optimizer state

    torchrun_train(
        recipe,
        world,
        tmp_path / "z3_resumed",
        "zero3",
        *overrides(max_steps=4, save_format="full", resume_from_checkpoint=str(checkpoint), **BATCH),
    )
    assert_same_training(tmp_path / "z3_resumed", single[4], world[0])
    steps2, steps4 = moe_params(single[2]), moe_params(single[4])  # TOL is far below what 2 steps move
    assert max((steps4[n] - steps2[n]).abs().max() for n in steps2 if is_new(n)) > 100 * TOL


STARVED = (0, 3)  # expert 0 (frozen: the loop path skips its MLP) and a trained new expert

# Process 1 routes no token to STARVED (their router logits pushed to −∞), process 0 routes as usual; each
# process checks that its routing really was so. Before the MoE blocks were ZeRO-3 leaves this stopped at the
# first step: process 0 gathered expert 0's MLP, process 1 skipped it (gloo: "Received data size doesn't match").
STARVING = textwrap.dedent(f"""
    import os, sys
    from train_helpers import starve_experts
    rank = int(os.environ["RANK"])
    seen = starve_experts({STARVED}, lambda n: rank == 1)
    from moelpr.cli import main
    code = main(sys.argv[1:])
    if rank == 1:
        assert seen["fed"] == 0 and seen["starved"] > 0 and seen["starved_pairs"] == 0, seen
    else:
        assert seen["starved"] == 0 and seen["fed_pairs"] > 0, seen
    sys.exit(code)
""")


@pytest.mark.slow  # ~30 s on 2 busy cores: one torchrun launch of DeepSpeed, one single-process run
@pytest.mark.parametrize("dispatch", ["loop", "grouped"])
def test_zero3_trains_when_one_process_routes_nothing_to_an_expert(world, recipe, tmp_path, monkeypatch, dispatch):
    """2 steps of ZeRO-3 with process 1 starving two experts reach the weights of one process whose odd
    micro-batches (process 1's share of each global batch) starve them; a timeout fails instead of hanging."""
    torchrun_train(
        recipe,
        world,
        tmp_path / "z3",
        "zero3",
        *overrides(max_steps=2, save_format="full", moe_dispatch=dispatch, **BATCH),
        program=STARVING,
    )
    dense, corpora = world
    for name in ("router_logits", "route"):
        monkeypatch.setattr(MoEBlock, name, getattr(MoEBlock, name))  # restored after the test
    seen = starve_experts(STARVED, lambda n: n % 2 == 1)  # micro-batches 1, 3, ... are process 1's
    single = load_recipe(
        recipe,
        overrides(
            model=str(dense),
            corpora=str(corpora),
            max_steps=2,
            per_device_train_batch_size=1,
            gradient_accumulation_steps=4,
            save_format="full",
            moe_dispatch=dispatch,
            output_dir=str(tmp_path / "single"),
        ),
    )
    train(single)
    assert seen["starved_pairs"] == 0 and seen["fed_pairs"] > 0, seen
    assert_same_training(tmp_path / "z3", tmp_path / "single", dense)


@pytest.fixture
def no_leaked_deepspeed_config():
    """TrainingArguments with a DeepSpeed config register it globally (transformers); drop it afterwards."""
    from transformers.integrations import unset_hf_deepspeed_config

    yield
    unset_hf_deepspeed_config()


@pytest.mark.parametrize("case", ["lora", "no_gather"])
def test_zero3_refuses_what_it_cannot_save(world, tmp_path, capsys, no_leaked_deepspeed_config, case):
    """Before training: a LoRA baseline, or a ZeRO-3 config that does not gather the weights for saving."""
    dense, corpora = world
    config = json.loads((DEEPSPEED / "zero3.json").read_text())
    config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = case == "lora"
    (tmp_path / "zero3.json").write_text(json.dumps(config))
    recipe = TINY_RECIPES / ("lora.yaml" if case == "lora" else "stage1.yaml")
    assert (
        main(
            [
                "train",
                str(recipe),
                "--deepspeed",
                str(tmp_path / "zero3.json"),
                *overrides(model=str(dense), corpora=str(corpora), output_dir=str(tmp_path / "out")),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "ZeRO-3" in err and ("lora" in err if case == "lora" else "stage3_gather_16bit" in err)
    assert not (tmp_path / "out").exists()


def test_several_cpu_processes_refuse_use_cpu_false(world, tmp_path, capsys, monkeypatch):
    """Without use_cpu accelerate counts each CPU process alone (DDP trains 2 copies, DeepSpeed's batch check fails)."""
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)  # as on CI, also on a GPU machine
    monkeypatch.setenv("WORLD_SIZE", "2")
    dense, corpora = world
    assert (
        main(
            [
                "train",
                str(TINY_RECIPES / "stage1.yaml"),
                *overrides(model=str(dense), corpora=str(corpora), output_dir=str(tmp_path / "out"), use_cpu=False),
            ]
        )
        == 2
    )
    assert "use_cpu: true" in capsys.readouterr().err
