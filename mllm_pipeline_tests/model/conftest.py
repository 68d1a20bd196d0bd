"""Fixtures for the model tests."""

from __future__ import annotations

import pytest
import torch

from mllm_pipeline_tests.model.tiny import make_model


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tiny models are too small to gain from intra-op threads, and on a shared 2-core machine extra
    threads make them many times slower; run the model tests on one thread, then restore the setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_model():
    model = make_model()
    model.eval()
    return model
