"""Fixtures of the training tests."""
from __future__ import annotations

import pytest

from tests.hassod.train.train_helpers import one_thread


@pytest.fixture(autouse=True)
def _one_thread():
    """Every training test on one torch thread (see :func:`one_thread`)."""
    with one_thread():
        yield
