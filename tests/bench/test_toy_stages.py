"""bench/toy_stages.py: an arm never trains into a folder that holds an earlier run's checkpoints."""

from __future__ import annotations

import pytest

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
