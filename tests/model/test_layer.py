"""MoE dispatch equals a naive per-token computation, outputs and gradients."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moelpr.model.grouped as grouped
import moelpr.model.layer as layer
import moelpr.model.looped as looped
from moelpr.model.layer import MoEBlock, StackedExperts, new_router

# Every dispatch path, forced on CPU: the per-expert loop (CPU's own), the loop cut into chunks of 4 rows,
# grouped_mm per expert group (accelerator inference) and one grouped_mm for all experts (accelerator training).
PATHS = ["loop", "chunked_loop", "grouped_mm", "single_call"]


def force_path(monkeypatch, path):
    """Make the block take `path`; returns a list that records every `F.grouped_mm` call."""
    if path == "chunked_loop":
        monkeypatch.setattr(looped, "_CHUNK_BYTES", 4 * 48 * 4)  # 4 rows of (rows, I = 48) float32
    if path in ("grouped_mm", "single_call"):
        monkeypatch.setattr(layer, "use_grouped_mm", grouped.grouped_mm_available)
    if path == "single_call":
        monkeypatch.setattr(MoEBlock, "_single_grouped_call", lambda self, x: torch.is_grad_enabled())
    calls = []

    def spy(*args, **kwargs):
        calls.append(1)
        return grouped_mm(*args, **kwargs)

    grouped_mm = F.grouped_mm
    monkeypatch.setattr(F, "grouped_mm", spy)
    return calls


class GatedMLP(nn.Module):
    def __init__(self, hidden=32, inter=48, bias=False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=bias)
        self.up_proj = nn.Linear(hidden, inter, bias=bias)
        self.down_proj = nn.Linear(inter, hidden, bias=bias)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def make_block(groups=(3,), top_k=2, seed=0, bias=False, dtype=torch.float32):
    torch.manual_seed(seed)
    original = GatedMLP(bias=bias).to(dtype)
    experts = []
    for n in groups:
        e = StackedExperts.copies_of(original, n)
        with torch.no_grad():  # make the experts differ so routing matters
            e.gate_up_proj.add_(torch.randn_like(e.gate_up_proj) * 0.1)
            e.down_proj.add_(torch.randn_like(e.down_proj) * 0.1)
            if bias:
                e.gate_up_bias.add_(torch.randn_like(e.gate_up_bias) * 0.1)
        experts.append(e)
    like = original.down_proj.weight
    routers = [new_router(32, n + (g == 0), like=like) for g, n in enumerate(groups)]
    return MoEBlock(original=original, experts=experts, routers=routers, top_k=top_k)


def expert_fn(block, e):
    """Expert e as a plain function (e = 0: the original MLP)."""
    if e == 0:
        return block.original
    for group in block.experts:
        if e <= group.num_experts:

            def f(x, g=group, i=e - 1):
                h = x @ g.gate_up_proj[i].T + (0 if g.gate_up_bias is None else g.gate_up_bias[i])
                gate, up = h.chunk(2, -1)
                return (g.act_fn(gate) * up) @ g.down_proj[i].T + (0 if g.down_bias is None else g.down_bias[i])

            return f
        e -= group.num_experts
    raise IndexError


def naive(block, x):
    """Per token: softmax over all experts, top-k, renormalise when k > 1, weighted sum of expert outputs."""
    probs = block.router_logits(x).softmax(-1)
    k = min(block.top_k, block.num_experts)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        w, idx = probs[t].topk(k)
        if k > 1:
            w = w / w.sum()
        for j in range(k):
            out[t] = out[t] + w[j] * expert_fn(block, int(idx[j]))(x[t : t + 1])[0]
    return out


@pytest.mark.parametrize("groups, top_k", [((3,), 1), ((3,), 2), ((3,), 4), ((1,), 2), ((2, 3), 2), ((2, 0, 1), 3)])
# The single-call (accelerator) path serves bias-free experts only; biased ones always take the per-group path.
@pytest.mark.parametrize("path, bias", [(p, b) for p in PATHS for b in (False, True) if not (p == "single_call" and b)])
def test_dispatch_matches_naive_outputs_and_grads(groups, top_k, path, bias, monkeypatch):
    calls = force_path(monkeypatch, path)
    block = make_block(groups, top_k, bias=bias)
    x = torch.randn(2, 9, 32)
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    y = block(x1)
    assert bool(calls) == (path in ("grouped_mm", "single_call"))  # the path under test is the one taken
    y_ref = naive(block, x2.reshape(-1, 32)).view_as(x)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # inference takes the same path without saving anything for backward
        torch.testing.assert_close(block(x), y_ref, atol=1e-5, rtol=1e-5)
    grad_out = torch.randn_like(y)
    params = [p for p in block.parameters() if p.requires_grad]
    g1 = torch.autograd.grad(y, [x1, *params], grad_out)
    g2 = torch.autograd.grad(y_ref, [x2, *params], grad_out, allow_unused=True)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, torch.zeros_like(a) if b is None else b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("path", PATHS)
def test_frozen_original_and_unchosen_expert_get_no_gradient(path, monkeypatch):
    """Expert 0 frozen (stage 1): no gradient; an expert no token chose: a zero gradient; the rest as naive."""
    force_path(monkeypatch, path)
    block = make_block((3,), top_k=2)
    block.original.requires_grad_(False)
    x = torch.randn(12, 32)
    x[:, 0] = 1.0
    x.requires_grad_(True)
    with torch.no_grad():
        block.routers[0].weight[2] = 0.0
        block.routers[0].weight[2, 0] = -50.0  # expert 2 (new expert 1) is never chosen
    _, chosen = block.route(block.router_logits(x))
    assert 2 not in chosen and all(e in chosen for e in (0, 1, 3))
    y = block(x)
    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    assert all(p.grad is None for p in block.original.parameters())
    experts = block.experts[0]
    assert experts.gate_up_proj.grad[1].abs().sum() == 0 and experts.down_proj.grad[1].abs().sum() == 0
    x2 = x.detach().clone().requires_grad_(True)
    y_ref = naive(block, x2)
    trained = [experts.gate_up_proj, experts.down_proj, block.routers[0].weight]
    expected = torch.autograd.grad(y_ref, [x2, *trained], grad_out)
    got = [x.grad, experts.gate_up_proj.grad, experts.down_proj.grad, block.routers[0].weight.grad]
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("path, bias", [(p, b) for p in PATHS for b in (False, True) if not (p == "single_call" and b)])
def test_router_only_training_matches_naive(path, bias, monkeypatch):
    """Stage 2: every expert frozen, the routers and the input get gradients, as naive's."""
    force_path(monkeypatch, path)
    block = make_block((2, 3), top_k=2, bias=bias)
    block.original.requires_grad_(False)
    for group in block.experts:
        group.requires_grad_(False)
    x1 = torch.randn(18, 32, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    routers = [r.weight for r in block.routers]
    y = block(x1)
    grad_out = torch.randn_like(y)
    got = torch.autograd.grad(y, [x1, *routers], grad_out)
    expected = torch.autograd.grad(naive(block, x2), [x2, *routers], grad_out)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("path", PATHS)
def test_bf16_autocast_with_float32_weights(path, monkeypatch):
    """Mixed precision (float32 master weights, bf16 autocast): every path runs and matches the naive block."""
    force_path(monkeypatch, path)
    block = make_block((2, 1), top_k=2)
    x = torch.randn(20, 32)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = block(x1)
        y_ref = naive(block, x2)
    torch.testing.assert_close(y.float(), y_ref.float(), atol=3e-2, rtol=3e-2)
    grad_out = torch.randn_like(y)
    params = [p for p in block.parameters() if p.requires_grad]
    g1 = torch.autograd.grad(y, [x1, *params], grad_out)
    g2 = torch.autograd.grad(y_ref, [x2, *params], grad_out.to(y_ref.dtype))
    for p, a, b in zip([x1, *params], g1, g2):
        assert a.dtype == p.dtype == torch.float32
        torch.testing.assert_close(a, b.float(), atol=5e-2 * b.abs().max().item(), rtol=0)


@pytest.mark.parametrize("path", PATHS)
def test_bfloat16_dispatch_close_to_naive(path, monkeypatch):
    force_path(monkeypatch, path)
    block = make_block((3,), 2, dtype=torch.bfloat16)
    x = torch.randn(16, 32, dtype=torch.bfloat16)
    torch.testing.assert_close(block(x).float(), naive(block, x).float(), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("path", PATHS)
def test_idle_experts_stay_in_graph(path, monkeypatch):
    """An expert group that receives no token still gets a (zero) gradient, so DDP never sees it unused."""
    force_path(monkeypatch, path)
    block = make_block((2,), top_k=1)
    with torch.no_grad():
        block.routers[0].weight.zero_()
        block.routers[0].weight[0] = 10.0  # everything to expert 0 for positive inputs
    x = torch.rand(5, 32) + 0.1
    block(x).sum().backward()
    assert block.experts[0].gate_up_proj.grad is not None
    assert block.experts[0].gate_up_proj.grad.abs().sum() == 0


@pytest.mark.parametrize("path", PATHS)
def test_expert_limit_confines_tokens(path, monkeypatch):
    force_path(monkeypatch, path)
    block = make_block((3,), top_k=2)
    x = torch.randn(6, 32)
    limit = torch.tensor([1, 1, 1, 4, 4, 4])
    weights, experts = block.route(block.router_logits(x), limit)
    y = block.dispatch(x, weights, experts, limited=True)
    torch.testing.assert_close(y[:3], block.original(x[:3]), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(y[3:], block(x)[3:], atol=1e-6, rtol=1e-5)


def test_top1_scales_by_raw_probability():
    block = make_block((2,), top_k=1)
    x = torch.randn(4, 32)
    probs = block.router_logits(x).softmax(-1)
    p, idx = probs.max(-1)
    expected = torch.stack([p[t] * expert_fn(block, int(idx[t]))(x[t : t + 1])[0] for t in range(4)])
    torch.testing.assert_close(block(x), expected, atol=1e-6, rtol=1e-5)
