"""Environment and fixtures for every test. Shared helpers (`tiny`, `train_helpers`, `layermoe_helpers`) live in
this directory, which pyproject's `[tool.pytest.ini_options] pythonpath` puts on the import path."""

import os
import tempfile

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# training from raw corpora prepares them into the datasets cache: keep the tests' out of the user's
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="moelpr-tests-datasets-"))
# remote code loaded in tests (trust_remote_code) is cached here, not in the user's ~/.cache
os.environ.setdefault("HF_MODULES_CACHE", tempfile.mkdtemp(prefix="moelpr-tests-hf-modules-"))


import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny test tensors: intra-op threads only add synchronisation (index_add_ was 300x slower with two
    threads on a busy 2-core machine). Tests that time real work set their own thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
