"""MoE dispatch: every path of the public switch (`MoEBlock.dispatch`), forced on CPU, equals the reference
(`moelpr.model.dispatch.reference`, the definition), which equals a naive per-token computation; outputs and
gradients."""

import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moelpr.model.dispatch as dispatch
import moelpr.model.looped as looped
from moelpr.model.layer import MoEBlock, StackedExperts, new_router

# The paths: the per-expert loop (CPU's own), the loop cut into chunks of 4 rows, one grouped_mm for all experts
# (GPUs from compute capability 9.0) and the same with the Triton kernel of Ampere GPUs (here a stand-in with the
# kernel's contract: the Triton kernel itself needs a GPU).
PATHS = ["loop", "chunked_loop", "grouped", "triton"]


def triton_stand_in(calls):
    """DeepSpeed's `group_gemm_triton` contract, checked, computed with `F.grouped_mm`."""
    grouped_mm = F.grouped_mm

    def group_gemm_triton(mat_a, mat_b, offs, trans_b=False):
        assert trans_b and mat_b.is_contiguous() and mat_a.dtype == mat_b.dtype  # as its _validate asks
        assert offs.dtype == torch.int32 and offs.shape == (mat_b.shape[0],)
        calls.append("triton")
        return grouped_mm(mat_a, mat_b.transpose(-2, -1), offs=offs)

    return group_gemm_triton


def force_path(monkeypatch, path):
    """The `MoEBlock.dispatch` setting that takes `path`, and a list that records every grouped matmul call."""
    calls = []
    if path == "chunked_loop":
        monkeypatch.setattr(looped, "_CHUNK_BYTES", 4 * 48 * 4)  # 4 rows of (rows, I = 48) float32
    if path == "triton":
        kernel = importlib.import_module("deepspeed.ops.triton_ops.group_gemm_triton")
        monkeypatch.setattr(kernel, "group_gemm_triton", triton_stand_in(calls))
    grouped_mm = F.grouped_mm

    def spy(*args, **kwargs):
        calls.append("torch")
        return grouped_mm(*args, **kwargs)

    monkeypatch.setattr(F, "grouped_mm", spy)
    return {"chunked_loop": "loop"}.get(path, path), calls


class GatedMLP(nn.Module):
    def __init__(self, hidden=32, inter=48, bias=False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=bias)
        self.up_proj = nn.Linear(hidden, inter, bias=bias)
        self.down_proj = nn.Linear(inter, hidden, bias=bias)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def make_block(groups=(3,), top_k=2, seed=0, bias=False, dtype=torch.float32, dispatch="auto"):
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
    return MoEBlock(original=original, experts=experts, routers=routers, top_k=top_k, dispatch=dispatch)


def expert_fn(block, e):
    """Expert e as a plain function (e = 0: the original MLP), written out from the weights."""
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


def reference(block, x):
    """The definition in the model code, on `block`'s own routing of `x` `(N, H)`."""
    return dispatch.reference(block, x, block.route(x))


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


GROUPED = ("grouped", "triton")  # the grouped paths serve bias-free experts only (auto takes the loop for biases)
SHAPES = [((3,), 1), ((3,), 2), ((3,), 4), ((1,), 2), ((2, 3), 2), ((2, 0, 1), 3)]


@pytest.mark.parametrize("groups, top_k", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_reference_is_the_naive_per_token_computation(groups, top_k, bias):
    block = make_block(groups, top_k, bias=bias)
    x1 = torch.randn(18, 32, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    y, y_ref = reference(block, x1), naive(block, x2)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    grad_out = torch.randn_like(y)
    params = [p for p in block.parameters() if p.requires_grad]
    g1 = torch.autograd.grad(y, [x1, *params], grad_out)
    g2 = torch.autograd.grad(y_ref, [x2, *params], grad_out, allow_unused=True)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, torch.zeros_like(a) if b is None else b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("groups, top_k", SHAPES)
@pytest.mark.parametrize("path, bias", [(p, b) for p in PATHS for b in (False, True) if not (p in GROUPED and b)])
def test_every_path_matches_the_reference_outputs_and_grads(groups, top_k, path, bias, monkeypatch):
    setting, calls = force_path(monkeypatch, path)
    block = make_block(groups, top_k, bias=bias, dispatch=setting)
    x = torch.randn(2, 9, 32)
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    y = block(x1)
    # the path under test is the one taken: the grouped ones through their kernel, the loop through none
    assert set(calls) == ({"torch"} if path == "grouped" else {"triton"} if path == "triton" else set())
    y_ref = reference(block, x2.reshape(-1, 32)).view_as(x)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # inference takes the same path without saving anything for backward
        torch.testing.assert_close(block(x), y_ref, atol=1e-5, rtol=1e-5)
    grad_out = torch.randn_like(y)
    params = [p for p in block.parameters() if p.requires_grad]
    g1 = torch.autograd.grad(y, [x1, *params], grad_out)
    g2 = torch.autograd.grad(y_ref, [x2, *params], grad_out)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_grouped_paths_refuse_biased_experts(monkeypatch):
    setting, _ = force_path(monkeypatch, "grouped")
    block = make_block((2,), 2, bias=True, dispatch=setting)
    with pytest.raises(dispatch.UserError, match="bias-free experts"):
        block(torch.randn(3, 32))


def test_auto_takes_the_loop_on_cpu_and_for_inference():
    block = make_block((2,), 2)
    x = torch.randn(3, 32)
    assert dispatch.auto_path(block, x) == "loop"
    with torch.no_grad():
        assert dispatch.auto_path(block, x) == "loop"
    with pytest.raises(dispatch.UserError, match="unknown moe_dispatch 'fast'"):
        block.dispatch = "fast"


@pytest.mark.parametrize(
    "training, capability, fits, triton, expected",
    [
        (True, (9, 0), True, False, "grouped"),  # H100/H200: torch's fused grouped_mm
        (True, (10, 0), True, True, "grouped"),  # Blackwell
        (True, (8, 0), True, True, "triton"),  # A100/A800 with deepspeed: the sync-free Triton kernel
        (True, (8, 6), True, False, "grouped"),  # Ampere without it: torch's fallback, with a warning
        (False, (9, 0), True, True, "loop"),  # inference (decoding) touches only the chosen experts
        (True, None, True, True, "loop"),  # CPU, ROCm, other accelerators
        (True, (9, 0), False, True, "loop"),  # biased experts, or rows a grouped kernel cannot align
    ],
)
def test_auto_rule_by_device(training, capability, fits, triton, expected, recwarn):
    got = dispatch.choose_path(training=training, cuda_capability=capability, grouped_fits=fits, triton=lambda: triton)
    assert got == expected
    warned = [w for w in recwarn if "synchronises with the host" in str(w.message)]
    assert len(warned) <= 1 and (not warned or capability == (8, 6))


@pytest.mark.parametrize("path", PATHS)
def test_frozen_original_and_unchosen_expert_get_no_gradient(path, monkeypatch):
    """Expert 0 frozen (stage 1): no gradient; an expert no token chose: a zero gradient; the rest as naive."""
    setting, _ = force_path(monkeypatch, path)
    block = make_block((3,), top_k=2, dispatch=setting)
    block.original.requires_grad_(False)
    x = torch.randn(12, 32)
    x[:, 0] = 1.0
    x.requires_grad_(True)
    with torch.no_grad():
        block.routers[0].weight[2] = 0.0
        block.routers[0].weight[2, 0] = -50.0  # expert 2 (new expert 1) is never chosen
    chosen = block.route(x).experts
    assert 2 not in chosen and all(e in chosen for e in (0, 1, 3))
    y = block(x)
    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    assert all(p.grad is None for p in block.original.parameters())
    experts = block.experts[0]
    assert experts.gate_up_proj.grad[1].abs().sum() == 0 and experts.down_proj.grad[1].abs().sum() == 0
    x2 = x.detach().clone().requires_grad_(True)
    y_ref = reference(block, x2)
    trained = [experts.gate_up_proj, experts.down_proj, block.routers[0].weight]
    expected = torch.autograd.grad(y_ref, [x2, *trained], grad_out)
    got = [x.grad, experts.gate_up_proj.grad, experts.down_proj.grad, block.routers[0].weight.grad]
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("path, bias", [(p, b) for p in PATHS for b in (False, True) if not (p in GROUPED and b)])
def test_router_only_training_matches_the_reference(path, bias, monkeypatch):
    """Stage 2: every expert frozen, the routers and the input get gradients, as the reference's."""
    setting, _ = force_path(monkeypatch, path)
    block = make_block((2, 3), top_k=2, bias=bias, dispatch=setting)
    block.original.requires_grad_(False)
    for group in block.experts:
        group.requires_grad_(False)
    x1 = torch.randn(18, 32, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    routers = [r.weight for r in block.routers]
    y = block(x1)
    grad_out = torch.randn_like(y)
    got = torch.autograd.grad(y, [x1, *routers], grad_out)
    expected = torch.autograd.grad(reference(block, x2), [x2, *routers], grad_out)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("path", PATHS)
def test_bf16_autocast_with_float32_weights(path, monkeypatch):
    """Mixed precision (float32 master weights, bf16 autocast): every path runs and matches the reference."""
    setting, _ = force_path(monkeypatch, path)
    block = make_block((2, 1), top_k=2, dispatch=setting)
    x = torch.randn(20, 32)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = block(x1)
        y_ref = reference(block, x2)
    torch.testing.assert_close(y.float(), y_ref.float(), atol=3e-2, rtol=3e-2)
    grad_out = torch.randn_like(y)
    params = [p for p in block.parameters() if p.requires_grad]
    g1 = torch.autograd.grad(y, [x1, *params], grad_out)
    g2 = torch.autograd.grad(y_ref, [x2, *params], grad_out.to(y_ref.dtype))
    for p, a, b in zip([x1, *params], g1, g2):
        assert a.dtype == p.dtype == torch.float32
        torch.testing.assert_close(a, b.float(), atol=5e-2 * b.abs().max().item(), rtol=0)


@pytest.mark.parametrize("path", PATHS)
def test_bfloat16_dispatch_close_to_the_reference(path, monkeypatch):
    setting, _ = force_path(monkeypatch, path)
    block = make_block((3,), 2, dtype=torch.bfloat16, dispatch=setting)
    x = torch.randn(16, 32, dtype=torch.bfloat16)
    torch.testing.assert_close(block(x).float(), reference(block, x).float(), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("path", PATHS)
def test_idle_experts_stay_in_graph(path, monkeypatch):
    """An expert group that receives no token still gets a (zero) gradient, so DDP never sees it unused."""
    setting, _ = force_path(monkeypatch, path)
    block = make_block((2,), top_k=1, dispatch=setting)
    with torch.no_grad():
        block.routers[0].weight.zero_()
        block.routers[0].weight[0] = 10.0  # everything to expert 0 for positive inputs
    x = torch.rand(5, 32) + 0.1
    block(x).sum().backward()
    assert block.experts[0].gate_up_proj.grad is not None
    assert block.experts[0].gate_up_proj.grad.abs().sum() == 0


class FixedLimits(nn.Module):
    """A classifier stand-in that gives token t the expert limit `limits[t]` (1 = expert 0 alone)."""

    def __init__(self, limits):
        super().__init__()
        self.limits = torch.tensor(limits)

    def forward(self, hidden_states):
        return self.limits, torch.zeros(hidden_states.shape[0], 2)


@pytest.mark.parametrize("path", ["reference", *PATHS])
def test_expert_limit_confines_tokens(path, monkeypatch):
    setting, _ = force_path(monkeypatch, path)
    block = make_block((3,), top_k=2, dispatch=setting)
    x = torch.randn(6, 32)
    free = block(x)
    block.classifier = FixedLimits([1, 1, 1, 4, 4, 4])
    routing = block.route(x)
    assert routing.expert0_weight()[:3].tolist() == [1.0, 1.0, 1.0]  # as applied: expert 0 alone
    y = block(x)
    torch.testing.assert_close(y[:3], block.original(x[:3]), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(y[3:], free[3:], atol=1e-6, rtol=1e-5)


def test_top1_scales_by_raw_probability():
    block = make_block((2,), top_k=1)
    x = torch.randn(4, 32)
    probs = block.router_logits(x).softmax(-1)
    p, idx = probs.max(-1)
    expected = torch.stack([p[t] * expert_fn(block, int(idx[t]))(x[t : t + 1])[0] for t in range(4)])
    torch.testing.assert_close(block(x), expected, atol=1e-6, rtol=1e-5)
