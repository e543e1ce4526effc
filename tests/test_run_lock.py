"""One run per checkpoint folder: a second fit on a live run's folder is refused, naming the holder;
a lock whose process is gone is taken over."""

import json
import os
import socket
import subprocess
import sys

import pytest

from mpp.cli import main
from mpp.run_lock import RunLock
from tests.helpers import fit_args


def test_a_second_fit_on_a_live_runs_folder_is_refused_naming_its_pid_and_host(in_tmp, toy_models, toy_prepared):
    folder = in_tmp / "runs/checkpoints/stage1"
    with RunLock(str(folder), 0):  # this process is the live holder
        with pytest.raises(ValueError, match=rf"in use by another run \(PID {os.getpid()} on {socket.gethostname()}"):
            main(fit_args(1, toy_models, toy_prepared, "--trainer.max_steps=1"))
        assert not (folder / "step=0000001.ckpt").exists()
    main(fit_args(1, toy_models, toy_prepared, "--trainer.max_steps=1"))  # released: the run goes ahead
    assert (folder / "final.ckpt").exists() and not (folder / ".lock-rank0").exists()


def test_a_lock_left_by_a_killed_run_is_taken_over(tmp_path, caplog):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / ".lock-rank0").write_text(json.dumps({"host": socket.gethostname(), "pid": int(gone.stdout),
                                                      "started": "earlier"}))
    with RunLock(str(tmp_path), 0):
        assert json.loads((tmp_path / ".lock-rank0").read_text())["pid"] == os.getpid()
    assert "taking over" in caplog.text and not (tmp_path / ".lock-rank0").exists()
