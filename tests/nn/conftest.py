"""Shared fixtures for the mpp.nn tests: a tiny FLUX config and models around it."""

from __future__ import annotations

import pytest
import torch

from mpp.nn import HeadsConfig, MppFlux, build_backbone
from tests.helpers import DIMS, LORA_RANK, load_tiny_config


@pytest.fixture(scope="session")
def tiny_config() -> dict:
    return load_tiny_config()


@pytest.fixture
def make_model(tiny_config):
    """make_model(seed=0, **HeadsConfig fields) → (model in eval mode, untouched copy of the plain backbone)."""

    def make(seed: int = 0, **kwargs):
        torch.manual_seed(seed)
        backbone = build_backbone(config=tiny_config)
        plain = build_backbone(config=tiny_config)
        plain.load_state_dict(backbone.state_dict())
        heads = HeadsConfig(**{"lora_rank": LORA_RANK, **kwargs})
        return MppFlux(backbone, **DIMS, heads=heads).eval(), plain.eval()

    return make




@pytest.fixture(autouse=True)
def _one_thread():
    """The tiny models gain nothing from intra-op threads and suffer badly from oversubscription on a
    shared CPU (2 threads under load: ~10x slower); restored after each test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
