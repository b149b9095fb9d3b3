"""Shared test fixtures."""

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def repo_root() -> Path:
    """The repository root, so that tests do not depend on the working directory."""
    return REPO_ROOT
