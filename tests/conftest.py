"""Shared test fixtures."""

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def repo_root() -> Path:
    """The repository root, so that tests do not depend on the working directory."""
    return REPO_ROOT


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fail the test if a script gets as far as loading a model."""
    import nucleiseg.inference.predictor

    def refuse_to_load(*args, **kwargs):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(nucleiseg.inference.predictor, "load_fold_models", refuse_to_load)
