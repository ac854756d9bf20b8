"""torch.compile (inductor, on CPU) on an upcycled model: the compiled model computes what the eager one does,
and its graph breaks are the designed ones (docs/benchmarks.md, "torch.compile"):
- the loop path runs its experts eagerly, one break per MoE block (it reads pair counts on the host);
- the grouped path has none in bfloat16, the dtype GPUs train in; in float32 each grouped matmul runs eagerly
  (torch.compile traces `grouped_mm` in bfloat16 only).
`tests/train/test_loss_regression.py` trains both stages with `torch_compile: true` through `moe-lpr train`.
"""

import pytest
import torch
from tiny import tiny_ids, trained_moe
from torch._dynamo.utils import counters

import moelpr

LAYERS = 1  # decoder layers, each an MoE layer: one keeps inductor's compile short


def compiled(model, run, backend: str = "inductor"):
    """`run(torch.compile(model))` from a fresh dynamo state; returns its result and dynamo's graph breaks by reason."""
    torch._dynamo.reset()
    counters.clear()
    result = run(torch.compile(model, backend=backend))
    return result, dict(counters["graph_break"])


def moe(dispatch: str, dtype: torch.dtype = torch.float32):
    model = trained_moe("llama", num_hidden_layers=LAYERS).to(dtype)
    model.set_moe_dispatch(dispatch)
    return model


@pytest.mark.slow  # inductor generates and compiles C++ kernels: 20-60 s on 2 busy cores
def test_compiled_forward_gives_eager_logits():
    """Inductor, the loop path (CPU's), float32: eager's logits; the one kind of graph break is the loop's."""
    model = moe("loop")
    ids = tiny_ids(batch=2, seq=16)
    with torch.no_grad():
        want = model(input_ids=ids).logits
        got, breaks = compiled(model, lambda m: m(input_ids=ids).logits)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert breaks and all("torch.compiler.disable" in reason for reason in breaks), breaks


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_grouped_training_step_breaks_only_where_designed(dtype):
    """Stage 1's forward and backward on the grouped path: eager's loss and gradients; in bfloat16 one graph with
    no break, in float32 breaks at the (eager) grouped matmuls only.

    Graph breaks are dynamo's: AOTAutograd's eager backend traces the same forward and backward graphs as
    inductor, without inductor's code generation (minutes for bfloat16 on 2 CPU cores)."""
    model = moe("grouped", dtype).train()
    moelpr.set_trainable(model, "stage1")
    ids = tiny_ids(batch=2, seq=16)

    def step(m):
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad(set_to_none=True)
        return loss.detach(), grads

    want_loss, want_grads = step(model)
    (loss, grads), breaks = compiled(model, step, backend="aot_eager")
    if dtype == torch.bfloat16:
        assert not breaks and counters["stats"]["unique_graphs"] == 1, breaks
    else:
        assert breaks and all("torch.compiler.disable" in reason for reason in breaks), breaks
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5  # bfloat16: another summation order moves the last bits
    torch.testing.assert_close(loss, want_loss, rtol=tol, atol=0)
    assert grads.keys() == want_grads.keys() and any(".mlp.experts." in n for n in grads)
    for name, grad in want_grads.items():
        assert (grads[name].float() - grad.float()).abs().max() <= tol * grad.float().abs().max() + 1e-7, name
