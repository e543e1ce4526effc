import random
from pathlib import Path

import numpy as np
import pytest
import torch

from mpp.prepare import prepare_dataset
from mpp.toy.bundle import toy_encoder_settings
from mpp.toy.models import build_toy_models
from mpp.toy.scenes import ToyWorld, frames_for
from tests.helpers import TOY_SIZE, WIDE_BUCKETS, WIDE_RATIOS


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny models are bound by per-op overhead: one intra-op thread is faster on a small machine
    and immune to oversubscription when something else runs beside the tests."""
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same global RNG state, whatever ran before it (order-independent)."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def toy_world():
    return ToyWorld(image_size=TOY_SIZE, seed=0)


@pytest.fixture(scope="session")
def toy_models(tmp_path_factory, toy_world) -> Path:
    """The toy model bundle (random backbone, untrained vision encoders), built once per test session
    (read-only for tests: copy it before changing it)."""
    return build_toy_models(tmp_path_factory.mktemp("toy_models"), world=toy_world)


@pytest.fixture(scope="session")
def toy_settings(toy_models):
    return toy_encoder_settings(toy_models)


@pytest.fixture(scope="session")
def toy_raw(tmp_path_factory, toy_world):
    """A raw folder (DESIGN.md section 2 format) of 24 toy scenes."""
    root = tmp_path_factory.mktemp("toy_raw")
    toy_world.write_raw(str(root), 24)
    return str(root)


@pytest.fixture(scope="session")
def toy_prepared(tmp_path_factory, toy_raw, toy_settings):
    """The prepared toy dataset (read-only for tests: copy it before changing it)."""
    out = str(tmp_path_factory.mktemp("toy_prepared"))
    result = prepare_dataset(toy_raw, out, encoders=toy_settings, resolution=TOY_SIZE, progress=False)
    assert not result.errors and len(result.written) == 24
    return out


@pytest.fixture(scope="session")
def toy_wide_raw(tmp_path_factory):
    """A raw folder of 30 toy scenes in square, 16:9 and 2.39:1 frames (not bucket sizes: preparation
    resizes and crops them)."""
    root = tmp_path_factory.mktemp("toy_wide_raw")
    ToyWorld(image_size=TOY_SIZE, seed=0, frames=frames_for(TOY_SIZE, WIDE_RATIOS)).write_raw(str(root), 30)
    return str(root)


@pytest.fixture(scope="session")
def toy_wide_prepared(tmp_path_factory, toy_wide_raw, toy_settings):
    """The widescreen toy dataset, prepared into the buckets 128×128, 176×96 and 192×80 (read-only)."""
    out = str(tmp_path_factory.mktemp("toy_wide_prepared"))
    result = prepare_dataset(toy_wide_raw, out, encoders=toy_settings, resolution=TOY_SIZE, buckets=WIDE_BUCKETS,
                             progress=False)
    assert not result.errors and len(result.written) == 30 and len(result.buckets) == 3
    return out


@pytest.fixture()
def in_tmp(tmp_path, monkeypatch):
    """The test's tmp_path as the working directory."""
    monkeypatch.chdir(tmp_path)
    return tmp_path
