"""bench/toy_stages.py: an arm never trains into a folder that holds an earlier run's checkpoints; the held-out
cast is unseen and named by its shape alone."""

from __future__ import annotations

import pytest

from mpp.toy.scenes import ToyWorld
from tests.helpers import load_bench


def test_an_arm_folder_with_checkpoints_of_an_earlier_run_is_refused(tmp_path):
    bench = load_bench("toy_stages")
    arm = tmp_path / "stage2"
    bench.check_fresh_arm(str(arm))  # absent: fine
    (arm / "runs/logs").mkdir(parents=True)
    bench.check_fresh_arm(str(arm))  # no checkpoint yet: fine
    (arm / "runs/checkpoints/stage2").mkdir(parents=True)
    (arm / "runs/checkpoints/stage2/step=0000100.ckpt").write_bytes(b"old")
    with pytest.raises(ValueError, match=r"stage2 already holds 1 checkpoints of an earlier run.*--workdir"):
        bench.check_fresh_arm(str(arm))


def test_the_held_out_cast_is_unseen_and_named_by_shape_alone():
    bench = load_bench("toy_stages")
    cast = bench.unseen_cast(8, 1, bench.IDENTITIES)
    training = ToyWorld(seed=bench.TOY_WORLD["seed"], num_identities=bench.IDENTITIES, describe_prob=bench.DESCRIBE,
                        min_box=bench.BOXES[0], max_box=bench.BOXES[1])
    assert len(cast) == 8 and not set(cast) & {i.name for i in training.identities}
    seen = [x for i in range(40) for x in training.scene(i).instances if x.foreground]
    assert 0.3 < sum(x.caption == training.identity(x.identity).caption for x in seen) / len(seen) < 0.7
    held_out = ToyWorld(seed=1, cast=cast, describe_prob=0.0, min_box=bench.BOXES[0], max_box=bench.BOXES[1])
    for x in (x for i in range(10) for x in held_out.scene(i).instances if x.foreground):
        assert x.caption == f"a {held_out.identity(x.identity).shape}"
        assert min(x.bbox[2] - x.bbox[0], x.bbox[3] - x.bbox[1]) >= bench.BOXES[0]
