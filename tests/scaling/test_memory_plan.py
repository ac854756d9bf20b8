"""Memory plan arithmetic: parameter counts against real upcycled models, what each engine shards, the phases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny import tiny_model

import moelpr
from moelpr.scaling.plan import (
    ActivationProfile,
    DenseShape,
    Engine,
    MoELayout,
    TrainingSetup,
    extrapolate,
    parameter_counts,
    plan,
)

ROOT = Path(__file__).resolve().parents[2]
LAYOUT = MoELayout(num_experts=4, top_k=2)
SHAPE = DenseShape(
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=1000,
)
NO_ACTIVATIONS = ActivationProfile(0, 0, 0, 0, 0, 0, 0, 0)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "phi3"])
@pytest.mark.parametrize("stage", [1, 2])
def test_counts_match_a_real_upcycled_model(arch, stage):
    dense = tiny_model(arch)
    shape = DenseShape.from_config(dense.config)
    model = moelpr.upcycle(dense, num_experts=LAYOUT.num_experts, top_k=LAYOUT.top_k)
    moelpr.set_trainable(model, f"stage{stage}")
    real = moelpr.parameter_counts(model)
    counts = parameter_counts(shape, LAYOUT)
    assert counts.total == real["total"]
    assert counts.trainable(stage) == real["trainable"]


def test_hand_computed_counts_of_a_tiny_llama():
    H, I, L, V, E = 64, 160, 3, 1000, 4
    attention = H * H + 2 * H * (2 * 16) + H * H  # q, k, v (2 kv heads of 16), o
    per_layer = attention + 2 * H + E * 3 * H * I + E * H
    counts = parameter_counts(SHAPE, LAYOUT)
    assert counts.total == 2 * V * H + H + L * per_layer
    assert counts.trainable(1) == L * ((E - 1) * 3 * H * I + E * H)  # frozen expert 0, attention, embeddings
    assert counts.trainable(2) == L * E * H  # routers only


def test_tied_embeddings_have_no_separate_head():
    tied = parameter_counts(DenseShape(**{**SHAPE.__dict__, "tie_word_embeddings": True}), LAYOUT)
    assert parameter_counts(SHAPE, LAYOUT).total - tied.total == SHAPE.vocab_size * SHAPE.hidden_size


def test_single_process_fp32_is_weights_gradients_and_two_moments():
    setup = TrainingSetup(stage=1, micro_batch=1, seq_len=8, precision="fp32")
    p = plan(SHAPE, LAYOUT, setup, Engine("single"), NO_ACTIVATIONS)
    counts = parameter_counts(SHAPE, LAYOUT)
    assert (p.weights, p.gradients, p.moments, p.master) == (
        4 * counts.total,
        4 * counts.trainable(1),
        8 * counts.trainable(1),
        0,
    )
    assert p.peak == p.weights + p.gradients + p.moments and p.peak_phase == "optimizer step"


def test_stage2_has_gradients_and_optimizer_state_for_routers_only():
    counts = parameter_counts(SHAPE, LAYOUT)
    setup = TrainingSetup(stage=2, micro_batch=1, seq_len=8)
    for name in ("single", "zero2", "zero3", "fsdp2"):
        p = plan(SHAPE, LAYOUT, setup, Engine(name, world_size=2), NO_ACTIVATIONS)
        assert p.trainable_params == SHAPE.num_hidden_layers * LAYOUT.num_experts * SHAPE.hidden_size
        per_param = {"single": 2, "zero2": 1, "zero3": 1, "fsdp2": 2}[name]  # bf16 .grad / bf16 or fp32 partition
        assert p.gradients == per_param * counts.trainable(2)


@pytest.mark.parametrize("world", [1, 2, 8])
def test_what_each_engine_shards(world):
    counts = parameter_counts(SHAPE, LAYOUT)
    total, trainable = counts.total, counts.trainable(1)
    setup = TrainingSetup(stage=1, micro_batch=1, seq_len=8)
    z2 = plan(SHAPE, LAYOUT, setup, Engine("zero2", world), NO_ACTIVATIONS)
    z3 = plan(SHAPE, LAYOUT, setup, Engine("zero3", world), NO_ACTIVATIONS)
    fsdp = plan(SHAPE, LAYOUT, setup, Engine("fsdp2", world), NO_ACTIVATIONS)
    ddp = plan(SHAPE, LAYOUT, setup, Engine("ddp", world), NO_ACTIVATIONS)
    assert z2.weights == 2 * total  # ZeRO-2 replicates the bf16 weights ...
    assert z3.weights == pytest.approx(2 * total / world)  # ... ZeRO-3 shards them
    assert fsdp.weights == pytest.approx((2 * (total - trainable) + 4 * trainable) / world)  # fp32 trainable shards
    for p in (z2, z3):  # fp32 master + fp32 moments of the trainable parameters only, sharded
        assert p.master == pytest.approx(4 * trainable / world) and p.moments == pytest.approx(8 * trainable / world)
        assert p.gradients == pytest.approx(2 * trainable / world)
    assert fsdp.master == 0 and fsdp.moments == pytest.approx(8 * trainable / world)
    assert ddp.weights == 2 * total and ddp.moments == 4 * trainable and ddp.master == 0  # pure bf16, replicated
    assert ddp.buffers == 2 * trainable  # DDP's gradient buckets


def test_zero3_charges_the_live_parameter_bound_of_its_config():
    zero3 = Engine.from_deepspeed(json.loads((ROOT / "recipes/deepspeed/zero3.json").read_text()), world_size=8)
    assert zero3.name == "zero3" and zero3.max_live_parameters == 10**9 and zero3.reduce_bucket_size is None
    setup = TrainingSetup(stage=2, micro_batch=1, seq_len=8)
    total = parameter_counts(SHAPE, LAYOUT).total
    gathered = {
        live: plan(SHAPE, LAYOUT, setup, Engine("zero3", 8, max_live_parameters=live), NO_ACTIVATIONS).buffers
        for live in (zero3.max_live_parameters, 1000)
    }
    resident = 2 * SHAPE.hidden_size**2  # the "auto" reduce bucket, H² bf16 elements
    assert gathered == {10**9: resident + 2 * total, 1000: resident + 2 * 1000}  # min(max_live, Ψ) bf16


def test_zero2_reduce_buckets_follow_its_config():
    zero2 = Engine.from_deepspeed(json.loads((ROOT / "recipes/deepspeed/zero2.json").read_text()), world_size=8)
    assert zero2.reduce_bucket_size == 500_000_000 and zero2.overlap_comm
    setup = TrainingSetup(stage=2, micro_batch=1, seq_len=8)
    p = plan(SHAPE, LAYOUT, setup, zero2, NO_ACTIVATIONS)
    assert p.buffers == 2 * 2 * 500_000_000 and p.peak_phase == "loss backward"  # two bf16 buckets in backward


def test_peak_phase_follows_the_activations():
    setup = TrainingSetup(stage=1, micro_batch=1, seq_len=8, precision="fp32")
    loss_heavy = ActivationProfile(10, 10, 0, 0, 0, 0, 0, 10**9)
    top_heavy = ActivationProfile(10, 10, 0, 0, 10**9, 0, 0, 0)
    assert plan(SHAPE, LAYOUT, setup, Engine("single"), loss_heavy).peak_phase == "loss backward"
    p = plan(SHAPE, LAYOUT, setup, Engine("single"), top_heavy)
    assert p.peak_phase == "backward of layer 2" and p.activations == 10 + 2 * 10 + 10**9


def test_gradient_accumulation_keeps_the_gradients_resident():
    base = TrainingSetup(stage=1, micro_batch=1, seq_len=8, precision="fp32")
    heavy = ActivationProfile(0, 0, 0, 0, 0, 0, 0, 10**9)
    fresh = plan(SHAPE, LAYOUT, base, Engine("single"), heavy)
    accumulating = plan(
        SHAPE, LAYOUT, base, Engine("single"), ActivationProfile(0, 0, 0, 0, 0, 0, 0, 10**9, fresh=False)
    )
    assert accumulating.peak - fresh.peak == pytest.approx(fresh.gradients)  # all .grad alive in the loss backward
    with pytest.raises(ValueError, match="fresh=False"):
        plan(SHAPE, LAYOUT, TrainingSetup(stage=1, micro_batch=1, seq_len=8, grad_accum=4), Engine("ddp"), heavy)


def test_extrapolation_is_exact_for_the_scaling_law():
    def law(s):
        return 7e6 / s**2 + 3e3 / s

    assert extrapolate({8: law(8), 16: law(16)}) == pytest.approx(law(1))


def test_replica_divides_every_width():
    replica = DenseShape(
        hidden_size=2048,
        intermediate_size=5504,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=16,
        vocab_size=151936,
    ).scaled(16)
    assert (replica.hidden_size, replica.intermediate_size, replica.head_size, replica.vocab_size) == (
        128,
        344,
        8,
        9496,
    )
    assert replica.num_attention_heads == 16 and replica.num_hidden_layers == 3
    with pytest.raises(ValueError, match="does not divide"):
        SHAPE.scaled(3)


def test_unknown_engine_is_refused():
    with pytest.raises(ValueError, match="unknown engine"):
        Engine("zero1")
