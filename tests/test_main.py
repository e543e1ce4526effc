"""The `mpp` entry point dispatches to each tool with the rest of the command line."""

import os
import subprocess
import sys

import pytest
import torch

from mpp.__main__ import DEBUG_ENV, USER_ERROR_EXIT, main
from tests.helpers import ROOT, fit_args


@pytest.mark.parametrize("tool", ["prepare", "generate", "evaluate", "toy", "fit", "validate", "predict",
                                  "params"])
def test_each_command_reaches_its_tool(tool, capsys):
    with pytest.raises(SystemExit) as e:
        main([tool, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert {"prepare": "run", "generate": "--layouts", "evaluate": "--generated", "toy": "models",
            "fit": "--trainer", "validate": "--ckpt_path", "predict": "--ckpt_path", "checkpoints": "latest",
            "params": "--"}[tool] in out


def test_unknown_command_prints_usage(capsys):
    assert main(["train"]) == 2
    assert "mpp generate" in capsys.readouterr().err


@pytest.mark.parametrize("tool, says", [("prepare", "usage: mpp prepare"), ("params", "usage: mpp params"),
                                        ("generate", "--model.sampling.steps"), ("fit", "usage: mpp [options] fit"),
                                        ("predict", "usage: mpp [options] predict")])
def test_each_tools_help_names_itself_and_its_pass_through(tool, says, capsys):
    with pytest.raises(SystemExit):
        main([tool, "--help"])
    assert says in capsys.readouterr().out.replace("\n", " ")


def _process(tmp_path, *command, debug=False):
    env = {k: v for k, v in os.environ.items() if k != DEBUG_ENV} | ({DEBUG_ENV: "1"} if debug else {})
    return subprocess.run([sys.executable, *command], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**env, "PYTHONPATH": ROOT})


def test_a_user_error_is_one_block_without_a_traceback_and_exit_2(tmp_path):
    args = ["export", "--config", os.path.join(ROOT, "configs/stage1.yaml"), "--ckpt_path", "nowhere.ckpt",
            "--out", "x"]
    run = _process(tmp_path, "-m", "mpp", *args)
    assert run.returncode == USER_ERROR_EXIT == 2
    assert run.stderr.splitlines()[-2:] == ["mpp: error: --ckpt_path 'nowhere.ckpt' is not a file",
                                            f"(set {DEBUG_ENV}=1 to see where it was raised)"]
    assert "Traceback" not in run.stderr
    debug = _process(tmp_path, "-m", "mpp", *args, debug=True)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "is not a file" in debug.stderr


def test_main_py_ends_a_user_error_the_same_way_naming_a_corrupt_checkpoint(tmp_path, toy_models, toy_prepared):
    torch.save({"state_dict": {"w": torch.zeros(1000)}, "global_step": 1}, tmp_path / "whole.ckpt")
    data = (tmp_path / "whole.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])  # a copy cut short
    run = _process(tmp_path, os.path.join(ROOT, "main.py"), *fit_args(1, toy_models, toy_prepared),
                   "--ckpt_path", str(tmp_path / "cut.ckpt"))
    assert run.returncode == 2, run.stderr[-2000:]
    assert run.stderr.splitlines()[-2].startswith(f"mpp: error: {tmp_path / 'cut.ckpt'}: not a readable checkpoint (")
    assert "Traceback" not in run.stderr
