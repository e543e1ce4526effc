import logging
import os
import subprocess
import time

import pytest
import torch

from mpp.checkpoints import AtomicCheckpointIO, latest_checkpoint, main


def _ckpt(step):
    return {"state_dict": {"w": torch.full((2,), float(step))}, "global_step": step, "mpp": {"stage": 1}}


def _write(path, step, mtime):
    torch.save(_ckpt(step), path)
    os.utime(path, (mtime, mtime))


def test_latest_skips_truncated_and_foreign_files(tmp_path, caplog):
    now = time.time()
    _write(tmp_path / "step=1.ckpt", 1, now - 30)
    _write(tmp_path / "step=2.ckpt", 2, now - 20)
    data = (tmp_path / "step=2.ckpt").read_bytes()
    (tmp_path / "step=3.ckpt").write_bytes(data[: len(data) // 2])  # a killed writer
    os.utime(tmp_path / "step=3.ckpt", (now - 10, now - 10))
    torch.save({"something": "else"}, tmp_path / "other.ckpt")
    with caplog.at_level(logging.WARNING):
        assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "step=2.ckpt")
    assert "step=3.ckpt" in caplog.text and "other.ckpt" in caplog.text
    assert (tmp_path / "step=3.ckpt").exists()  # never deleted


def test_latest_cli_for_the_scripts(tmp_path, capsys):
    assert main(["latest", str(tmp_path)]) == 1
    _write(tmp_path / "a.ckpt", 1, time.time())
    assert main(["latest", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "a.ckpt")


class _Explodes:
    def __reduce__(self):
        raise RuntimeError("disk full")


def test_atomic_save_keeps_the_old_file_when_a_write_fails(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "step=5.ckpt"
    io.save_checkpoint(_ckpt(5), path)
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="disk full"):
        io.save_checkpoint({"state_dict": {}, "bad": _Explodes()}, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["step=5.ckpt"]  # no temporary file left behind
    assert torch.load(path, weights_only=False)["global_step"] == 5


def test_train_stage_script_finds_the_previous_stage(tmp_path):
    """train_stage2.sh without CKPT passes the newest loadable stage-1 checkpoint to main.py."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    (tmp_path / "main.py").write_text("import sys; print(' '.join(sys.argv[1:]))\n")
    folder = tmp_path / "runs/checkpoints/stage1"
    folder.mkdir(parents=True)
    _write(folder / "step=1.ckpt", 1, time.time() - 5)
    (folder / "step=2.ckpt").write_bytes(b"truncated")
    # copies of the scripts beside a main.py that prints its arguments
    (tmp_path / "scripts").mkdir()
    for name in ("train_stage2.sh", "scripts/stage.sh"):
        (tmp_path / name).write_text(open(os.path.join(root, name)).read())
        (tmp_path / name).chmod(0o755)
    script = tmp_path / "train_stage2.sh"
    out = subprocess.run(["bash", str(script), "--config", "x.yaml"], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": root})
    assert out.stdout.strip() == ("fit --config configs/stage2.yaml --ckpt_path runs/checkpoints/stage1/step=1.ckpt "
                                  "--config x.yaml")
    assert "step=2.ckpt" in out.stderr
