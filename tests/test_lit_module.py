"""MppModule on its own: what its checkpoints' hyperparameters unpickle to."""

import pickle

from mpp.nn import HeadsConfig
from mpp.sampling import SamplingConfig


def _as_if_pickled_under(obj, module: str, name: str) -> bytes:
    """`obj` pickled as a checkpoint written when its class was `module.name` would hold it."""
    data = pickle.dumps(obj, protocol=0)  # protocol 0 names the class as plain text lines
    cls = type(obj)
    old = data.replace(f"c{cls.__module__}\n{cls.__qualname__}\n".encode(), f"c{module}\n{name}\n".encode())
    assert old != data
    return old


def test_hyperparameters_of_checkpoints_from_before_the_config_moves_unpickle():
    heads = HeadsConfig(lora_rank=4, lora_scope="all")
    assert pickle.loads(_as_if_pickled_under(heads, "mpp.lit_module", "Heads")) == heads
    sampling = SamplingConfig(steps=2, layout_guidance=3.0)
    assert pickle.loads(_as_if_pickled_under(sampling, "mpp.lit_module", "Sampling")) == sampling
