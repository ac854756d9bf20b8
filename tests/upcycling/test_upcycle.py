"""Upcycling: the vs-dense invariant on every supported architecture, generation, bad input."""

import pytest
import torch
from tiny import CONFIGS, tiny_ids, tiny_model
from transformers import GPT2Config, GPT2LMHeadModel

import moelpr
from moelpr import MoEBlock, UserError


@pytest.mark.parametrize("arch", sorted(CONFIGS))
@pytest.mark.parametrize("top_k", [2, 4])
def test_upcycled_logits_equal_dense(arch, top_k):
    dense = tiny_model(arch)
    ids = tiny_ids()
    with torch.no_grad():
        reference = dense(ids).logits
        moe = moelpr.upcycle(dense, num_experts=4, top_k=top_k).eval()
        logits = moe(ids).logits
    assert (logits - reference).abs().max().item() <= 1e-5
    assert moe.config.experts_per_layer == [4, 4, 4]
    assert all(isinstance(layer.mlp, MoEBlock) for layer in moe.lm.model.layers)


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_generate_with_cache_matches_dense(arch):
    dense = tiny_model(arch)
    ids = tiny_ids(batch=1, seq=5)
    with torch.no_grad():
        expected = dense.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
        moe = moelpr.upcycle(dense, num_experts=3, top_k=2).eval()
        produced = moe.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    assert torch.equal(produced, expected)


def test_expert_zero_is_the_original_module_and_frozen():
    dense = tiny_model()
    mlp = dense.model.layers[1].mlp
    moe = moelpr.upcycle(dense, num_experts=3)
    block = moe.lm.model.layers[1].mlp
    assert block.original is mlp
    assert not any(p.requires_grad for p in block.original.parameters())
    assert all(p.requires_grad for p in block.experts.parameters())
    assert block.routers[0].weight.shape == (3, 64) and block.routers[0].bias is None
    gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
    for e in range(2):
        assert torch.equal(block.experts[0].gate_up_proj[e], gate_up)
        assert torch.equal(block.experts[0].down_proj[e], mlp.down_proj.weight)


def test_per_layer_counts_and_layer_selection():
    moe = moelpr.upcycle(tiny_model(), num_experts=[3, 1, 2], top_k=2)
    layers = moe.lm.model.layers
    assert isinstance(layers[0].mlp, MoEBlock) and layers[0].mlp.num_experts == 3
    assert not isinstance(layers[1].mlp, MoEBlock)
    assert layers[2].mlp.num_experts == 2
    assert moe.config.moe_layers == [0, 2]
    moe2 = moelpr.upcycle(tiny_model(), num_experts=4, layers=[1])
    assert moe2.config.experts_per_layer == [1, 4, 1]


def test_router_logits_output_layout():
    moe = moelpr.upcycle(tiny_model(), num_experts=[3, 1, 5], top_k=2)
    ids = tiny_ids(batch=2, seq=7)
    out = moe(ids, output_router_logits=True)
    assert [tuple(t.shape) for t in out.router_logits] == [(14, 3), (14, 5)]
    assert all(t.dtype == torch.float32 for t in out.router_logits)
    assert moe(ids).router_logits is None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_experts=1), "num_experts must be at least 2"),
        (dict(num_experts=4, top_k=0), "top_k must be between 1"),
        (dict(num_experts=4, top_k=5), "top_k must be between 1"),
        (dict(num_experts=[2, 2]), "lists 2 counts but the model has 3 layers"),
        (dict(num_experts=4, layers=[0, 7]), "unknown layer index 7"),
        (dict(num_experts=[2, 0, 2]), "integers ≥ 1"),
    ],
)
def test_bad_arguments_raise_one_line_value_errors(kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        moelpr.upcycle(tiny_model(), **kwargs)
    assert isinstance(info.value, UserError) and "\n" not in str(info.value)


def test_unsupported_architecture_names_the_class():
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UserError, match="unsupported model GPT2LMHeadModel: expected .*gate_proj"):
        moelpr.upcycle(model)


def test_upcycling_twice_is_refused():
    moe = moelpr.upcycle(tiny_model())
    with pytest.raises(UserError, match="already upcycled"):
        moelpr.upcycle(moe)


def test_random_expert_init_is_the_no_copy_ablation():
    dense = tiny_model()
    original = {n: p.clone() for n, p in dense.state_dict().items()}
    moe = moelpr.upcycle(dense, num_experts=3, expert_init="random")
    assert moe.config.expert_init == "random"
    for block in moelpr.moe_blocks(moe):
        gate_up, down = block.experts[0].gate_up_proj, block.experts[0].down_proj
        assert not torch.equal(gate_up[0], gate_up[1])  # independent draws, not copies
        assert 0.01 < gate_up.std().item() < 0.04 and 0.01 < down.std().item() < 0.04  # initializer_range 0.02
        assert not torch.allclose(gate_up[0, : down.shape[2]], block.original.gate_proj.weight)
    kept = {
        n.replace("mlp.original.", "mlp."): p
        for n, p in moe.lm.state_dict().items()
        if ".experts." not in n and ".routers." not in n
    }
    assert kept.keys() == original.keys() and all(torch.equal(kept[n], original[n]) for n in kept)  # base untouched
    with pytest.raises(moelpr.UserError, match="expert_init"):
        moelpr.upcycle(tiny_model(), num_experts=3, expert_init="zeros")


def test_routers_keep_their_xavier_normal_init():
    """The wrapper's weight init must not redraw the routers with the base model's normal(initializer_range)."""
    moe = moelpr.upcycle(tiny_model(), num_experts=4)
    weights = torch.cat([b.routers[0].weight for b in moelpr.moe_blocks(moe)])  # (layers·E, H)
    expected = (2 / (4 + weights.shape[1])) ** 0.5  # xavier-normal std of a (4, H) matrix
    assert abs(weights.std().item() - expected) < 0.25 * expected
