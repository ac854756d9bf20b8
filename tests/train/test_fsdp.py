"""FSDP2 at the torch level on 2 CPU processes (torchrun, gloo): an upcycled tiny Llama with `fully_shard`
per decoder layer (each unit mixes the frozen expert 0 with trainable new experts and routers) and on the
root gives the loss and the new-expert and router gradients of one process on the same global batch, on the
CPU dispatch path and on the single-grouped-call path that GPUs take (forced here; `F.grouped_mm` runs on
CPU fp32), also when one process routes no token to two experts (expert 0, whose MLP the loop path then
skips, and a trained one); its gathered full state dict saves as our checkpoint.

Not through the Trainer: accelerate turns FSDP on only for GPU-like distributed types (MULTI_GPU, MULTI_NPU,
MULTI_XPU, ...), so on CPU `fsdp: true` trains with DDP; there is no supported switch for CPU FSDP.
"""

import os
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import tiny_ids, tiny_model
from train_helpers import starve_experts, torchrun

import moelpr
from moelpr.model.layer import MoEBlock

MODES = ("loop", "grouped")  # moe_dispatch: the CPU path, and the GPUs' training path forced on CPU
CASES = [(mode, False) for mode in MODES] + [(mode, True) for mode in MODES]  # (mode, process 1 starves STARVED)
STARVED = (0, 3)  # expert 0 (frozen) and a trained new expert get no token from process 1
GLOBAL_BATCH = 4  # sequences; each of the 2 processes takes 2

WORKER = textwrap.dedent("""
    import sys
    import torch
    import torch.distributed as dist
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    import moelpr
    from test_fsdp import CASES, STARVED, build, half_batch, result_file
    from train_helpers import starve_experts

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    seen = None
    for mode, starved in CASES:
        if starved and seen is None:  # from here on process 1 routes no token to STARVED
            seen = starve_experts(STARVED, lambda n: rank == 1)
        model = build(mode)
        for layer in model.lm.model.layers:
            fully_shard(layer)  # one unit: attention + MoE block (frozen expert 0, trainable new experts)
        fully_shard(model)
        assert all(isinstance(p, DTensor) for p in model.parameters())  # every parameter is a shard
        ids = half_batch(rank, world)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        mean /= world
        grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.requires_grad}
        frozen_grads = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
        if rank == 0:
            assert not frozen_grads, frozen_grads
            save_file({**grads, "loss": mean.reshape(1)}, f"{sys.argv[1]}/{result_file(mode, starved)}")
    if rank == 1:  # the routing really was so
        assert seen["fed"] == 0 and seen["starved"] > 0 and seen["starved_pairs"] == 0, seen
    else:
        assert seen["starved"] == 0 and seen["fed_pairs"] > 0, seen
    # what accelerate's get_state_dict does under FSDP2: the full weights, gathered on every process
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        moelpr.save_model(model, f"{sys.argv[1]}/saved", format="full", state_dict=full)
    dist.destroy_process_group()
""")


def build(mode: str = "loop"):
    """The tiny Llama upcycled to 4 experts (top-2), stage-1 trainable set, same weights in every process."""
    dense = tiny_model("llama", seed=0)
    torch.manual_seed(0)  # the routers' initialisation
    return moelpr.upcycle(dense, num_experts=4, top_k=2, aux_loss_coef=0.01, moe_dispatch=mode).train()


def half_batch(rank: int, world: int) -> torch.Tensor:
    ids = tiny_ids(batch=GLOBAL_BATCH, seq=16, seed=1)  # (4, 16)
    per = GLOBAL_BATCH // world
    return ids[rank * per : (rank + 1) * per]


def result_file(mode: str, starved: bool) -> str:
    """The worker's output for one case: loss and gradients."""
    return f"{mode}-starved.safetensors" if starved else f"{mode}.safetensors"


def reference(mode: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One process, the same global batch: the balance loss is per forward pass, so (L(half 0) + L(half 1)) / 2."""
    model = build(mode)
    loss = sum(model(input_ids=ids, labels=ids).loss for ids in (half_batch(r, 2) for r in range(2))) / 2
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    """Run the FSDP2 worker on 2 processes once; returns the folder with one safetensors file per mode."""
    out = tmp_path_factory.mktemp("fsdp")
    here = Path(__file__).parent
    path = os.pathsep.join([str(here), str(here.parent), *sys.path])  # the worker imports this module and tiny
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    proc = torchrun(["--no-python", sys.executable, "-c", WORKER, str(out)], env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


@pytest.mark.parametrize("mode, starved", CASES)
def test_fsdp2_two_processes_match_one(sharded, monkeypatch, mode, starved):
    """Process 1 starving STARVED is one process whose second half-batch (its forward 1) starves them."""
    if starved:
        for attr in ("router_logits", "route"):
            monkeypatch.setattr(MoEBlock, attr, getattr(MoEBlock, attr))  # restored after the test
        starve_experts(STARVED, lambda n: n == 1)
    got = load_file(str(sharded / result_file(mode, starved)))
    want_loss, want_grads = reference(mode)
    torch.testing.assert_close(got.pop("loss")[0], want_loss, rtol=1e-5, atol=0)
    assert got.keys() == want_grads.keys()
    assert any(".mlp.experts." in n for n in got) and any(".mlp.routers." in n for n in got)
    for name, grad in want_grads.items():
        assert grad.abs().max() > 0, name  # every new expert and router receives a gradient
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-7, msg=name)


def test_fsdp2_gathered_weights_save_as_our_checkpoint(sharded):
    """`moelpr.save_model(state_dict=...)` with FSDP2's gathered full state dict writes the unsharded model."""
    saved = dict(moelpr.load_model(sharded / "saved").named_parameters())
    want = dict(build().named_parameters())
    assert saved.keys() == want.keys()
    for name, param in want.items():
        assert torch.equal(saved[name], param), name
