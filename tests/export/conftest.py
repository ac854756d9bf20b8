"""Fixtures for the export / generation tests (helpers live in `export_helpers`)."""

from __future__ import annotations

import pytest
from tiny import trained_moe, word_tokenizer

import moelpr


@pytest.fixture(scope="session")
def tokenizer():
    return word_tokenizer()


@pytest.fixture(scope="session")
def moe_dir(tmp_path_factory):
    """A full MoE-LPR checkpoint (tiny Llama, experts [4, 1, 3], top-2) with a tokenizer."""
    path = tmp_path_factory.mktemp("moe") / "moe"
    moelpr.save_model(trained_moe(num_experts=[4, 1, 3]), path, format="full", tokenizer=word_tokenizer())
    return path
