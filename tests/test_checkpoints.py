import logging
import os
import subprocess
import sys
import time

import pytest
import torch

from mpp.checkpoints import AtomicCheckpointIO, latest_checkpoint, main, plan, remove_temporaries
from mpp.cli import main as fit
from mpp.resume import main as resume
from tests.helpers import fit_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ckpt(step, stage=1):
    return {"state_dict": {"w": torch.full((2,), float(step)), "v": torch.zeros(1)}, "global_step": step,
            "mpp": {"stage": stage, "micro_step": 2 * step, "keys": ["v", "w"]}}


def _write(path, step, mtime=None, stage=1):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(_ckpt(step, stage), path)
    if mtime is not None:
        os.utime(path, (mtime, mtime))


def test_latest_skips_truncated_and_foreign_files(tmp_path, caplog):
    now = time.time()
    _write(tmp_path / "step=1.ckpt", 1, now - 30)
    _write(tmp_path / "step=2.ckpt", 2, now - 20)
    data = (tmp_path / "step=2.ckpt").read_bytes()
    (tmp_path / "step=3.ckpt").write_bytes(data[: len(data) // 2])  # a killed writer
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


def test_latest_is_the_highest_step_directly_in_the_folder_whatever_the_mtimes(tmp_path):
    now = time.time()
    for step in (200, 400, 600):
        _write(tmp_path / f"step={step:07d}.ckpt", step, now - step)  # the newest step has the oldest mtime
    _write(tmp_path / "keep" / "step=0000800.ckpt", 800, now)  # a backup copy in a subfolder
    _write(tmp_path / "keep" / "step=0000200.ckpt", 200, now)
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "step=0000600.ckpt")
    os.utime(tmp_path / "step=0000400.ckpt", (now + 100, now + 100))  # touched
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "step=0000600.ckpt")
    # a checkpoint missing a weight it trained is not loadable
    broken = _ckpt(900)
    del broken["state_dict"]["v"]
    torch.save(broken, tmp_path / "step=0000900.ckpt")
    # neither is one with non-finite weights
    nan = _ckpt(1000)
    nan["state_dict"]["w"][0] = float("nan")
    torch.save(nan, tmp_path / "step=0001000.ckpt")
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "step=0000600.ckpt")


def test_plan_resumes_its_own_stage_else_starts_from_the_previous_final(tmp_path):
    root = tmp_path / "runs/checkpoints"
    assert plan(1, str(root)) == ("fresh", None)
    with pytest.raises(ValueError, match="stage 1 has not finished"):
        plan(2, str(root))
    _write(root / "stage1/step=0000002.ckpt", 2)
    assert plan(1, str(root)) == ("resume", str(root / "stage1/step=0000002.ckpt"))
    with pytest.raises(ValueError, match="train_stage1.sh"):
        plan(2, str(root))  # a partial stage 1 is never the start of stage 2
    _write(root / "stage1/final.ckpt", 4)
    assert plan(1, str(root)) == ("done", str(root / "stage1/final.ckpt"))
    assert plan(2, str(root)) == ("start", str(root / "stage1/final.ckpt"))
    _write(root / "stage2/step=0000001.ckpt", 1, stage=2)
    _write(root / "stage2/preempted.ckpt", 3, stage=2)
    assert plan(2, str(root)) == ("resume", str(root / "stage2/preempted.ckpt"))
    (root / "stage2/final.ckpt").write_bytes(b"truncated")  # not loadable: the stage is not finished
    assert plan(2, str(root))[0] == "resume"


def _script_copy(tmp_path):
    """The shipped scripts beside a main.py that prints its arguments."""
    (tmp_path / "main.py").write_text("import sys; print(' '.join(sys.argv[1:]))\n")
    (tmp_path / "scripts").mkdir()
    for name in ("train.sh", "train_stage1.sh", "train_stage2.sh", "train_stage3.sh", "scripts/stage.sh"):
        (tmp_path / name).write_text(open(os.path.join(ROOT, name)).read())
        (tmp_path / name).chmod(0o755)


def _run(tmp_path, script, *args, check=True):
    return subprocess.run(["bash", str(tmp_path / script), *args], capture_output=True, text=True, check=check,
                          env={**os.environ, "PYTHONPATH": ROOT, "PYTHON": sys.executable})


def test_stage_scripts_resume_their_own_stage_and_train_sh_runs_only_unfinished_stages(tmp_path):
    _script_copy(tmp_path)
    folder = tmp_path / "runs/checkpoints"
    _write(folder / "stage1/step=0000001.ckpt", 1)
    _write(folder / "stage1/final.ckpt", 2)
    (folder / "stage1/step=0000003.ckpt").write_bytes(b"truncated")
    out = _run(tmp_path, "train_stage2.sh", "--config", "x.yaml")
    assert out.stdout.strip() == ("fit --config configs/stage2.yaml --ckpt_path runs/checkpoints/stage1/final.ckpt "
                                  "--config x.yaml")
    _write(folder / "stage2/step=0000005.ckpt", 5, stage=2)
    _write(folder / "stage2/keep/step=0000009.ckpt", 9, stage=2)
    out = _run(tmp_path, "train_stage2.sh", "--config", "x.yaml")
    assert out.stdout.strip() == ("fit --config configs/stage2.yaml "
                                  "--ckpt_path runs/checkpoints/stage2/step=0000005.ckpt --config x.yaml")
    # train.sh: stage 1 is finished (skipped), stage 2 resumes, stage 3 starts from... the fake main.py
    # writes no final.ckpt for stage 2, so stage 3 refuses to start from a partial stage 2
    out = _run(tmp_path, "train.sh", "--config", "x.yaml", check=False)
    assert out.returncode == 1
    assert out.stdout.splitlines() == [
        "fit --config configs/stage2.yaml --ckpt_path runs/checkpoints/stage2/step=0000005.ckpt --config x.yaml"]
    assert "stage 1 is finished" in out.stderr and "stage 2 has not finished" in out.stderr
    # an explicit CKPT is passed as given
    out = _run(tmp_path, "train_stage3.sh", "some.ckpt")
    assert out.stdout.strip() == "fit --config configs/stage3.yaml --ckpt_path some.ckpt"


def test_remove_temporaries_leaves_checkpoints(tmp_path):
    _write(tmp_path / "step=1.ckpt", 1)
    (tmp_path / ".tmp-abc123step=2.ckpt").write_bytes(b"partial")
    assert remove_temporaries(str(tmp_path)) == [str(tmp_path / ".tmp-abc123step=2.ckpt")]
    assert os.listdir(tmp_path) == ["step=1.ckpt"]


def test_discovery_skips_and_names_what_its_stage_cannot_resume(tmp_path, caplog):
    """A NaN optimizer state, another stage's checkpoint, a file with no mpp entry and a link out of
    the folder, each at a higher step than the good one: plan resumes the good one and names the rest."""
    own = tmp_path / "runs/checkpoints/stage1"
    _write(own / "step=0000002.ckpt", 2)
    nan_adam = _ckpt(9)
    nan_adam["optimizer_states"] = [{"state": {0: {"exp_avg_sq": torch.tensor([float("nan"), 1.0])}}}]
    torch.save(nan_adam, own / "step=0000009.ckpt")
    _write(own / "preempted.ckpt", 8, stage=2)
    no_mpp = _ckpt(7)
    del no_mpp["mpp"]
    torch.save(no_mpp, own / "step=0000007.ckpt")
    _write(tmp_path / "elsewhere/step=0000006.ckpt", 6)
    os.symlink(tmp_path / "elsewhere/step=0000006.ckpt", own / "step=0000006.ckpt")
    with caplog.at_level(logging.WARNING):
        assert plan(1, str(tmp_path / "runs/checkpoints")) == ("resume", str(own / "step=0000002.ckpt"))
    said = caplog.text
    assert "step=0000009.ckpt: 1 tensors hold non-finite values, e.g. ['optimizer_states.0.state.0.exp_avg_sq']" in said
    assert "preempted.ckpt: a stage-2 checkpoint, not one of stage 1" in said
    assert "step=0000007.ckpt: not an mpp checkpoint (no 'mpp' entry)" in said
    assert f"step=0000006.ckpt: a link to {tmp_path / 'elsewhere/step=0000006.ckpt'}, outside {own}" in said
    # a stage-1 final.ckpt found in stage 2's folder does not make stage 2 done
    _write(tmp_path / "runs/checkpoints/stage2/final.ckpt", 3, stage=1)
    _write(own / "final.ckpt", 3)
    assert plan(2, str(tmp_path / "runs/checkpoints")) == ("start", str(own / "final.ckpt"))


def test_resume_skips_and_names_a_checkpoint_of_another_model(in_tmp, toy_models, toy_prepared, caplog, capsys):
    """A stage-1 checkpoint trained with a coarser modulation grid, at a higher step than the good
    one: `mpp.resume` (what the stage scripts run) builds this config's model on the meta device and
    resumes the good one; `plan` without the fit arguments cannot tell them apart."""
    fit(fit_args(1, toy_models, toy_prepared, "--trainer.max_steps=1"))
    own = in_tmp / "runs/checkpoints/stage1"
    os.unlink(own / "final.ckpt")
    other = in_tmp / "other"
    other.mkdir()
    os.chdir(other)
    fit(fit_args(1, toy_models, toy_prepared, "--trainer.max_steps=2", "--model.heads.modulation_grid=2"))
    os.chdir(in_tmp)
    os.replace(other / "runs/checkpoints/stage1/step=0000002.ckpt", own / "step=0000002.ckpt")
    assert plan(1, "runs/checkpoints") == ("resume", "runs/checkpoints/stage1/step=0000002.ckpt")
    args = fit_args(1, toy_models, toy_prepared)[1:]
    capsys.readouterr()
    with caplog.at_level(logging.WARNING):
        assert resume(["1", "runs/checkpoints", *args]) == 0
    assert capsys.readouterr().out.strip() == "resume runs/checkpoints/stage1/step=0000001.ckpt"
    assert "step=0000002.ckpt: trained as another model: " in caplog.text and "differ in shape" in caplog.text


def test_resume_prints_the_plan(in_tmp, toy_models, toy_prepared, capsys):
    assert resume(["1", "runs/checkpoints", *fit_args(1, toy_models, toy_prepared)[1:]]) == 0
    assert capsys.readouterr().out.strip() == "fresh"
