import pytest
from train_helpers import build_dense, write_corpora


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """(dense model dir, corpora.yaml) shared by the training tests (read-only)."""
    root = tmp_path_factory.mktemp("train_world")
    return build_dense(root), write_corpora(root / "data")
