"""Fixtures for the model tests."""

from __future__ import annotations

import pytest

from mllm_pipeline_tests.model.tiny import make_model


@pytest.fixture(scope="module")
def tiny_model():
    model = make_model()
    model.eval()
    return model
