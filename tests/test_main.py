"""The `mpp` entry point dispatches to each tool with the rest of the command line."""

import pytest

from mpp.__main__ import main


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
