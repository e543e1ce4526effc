"""The user's own shots rendered as training goes (`images.layouts`), to TensorBoard and as PNGs."""

import json

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mpp.cli import main
from tests.helpers import fit_args, write_sample_shots


def test_sample_layouts_are_rendered_to_tensorboard_and_pngs_from_fixed_seeds(in_tmp, toy_models, toy_prepared,
                                                                               toy_world):
    shots = write_sample_shots(in_tmp, toy_world)
    cli = main(fit_args(1, toy_models, toy_prepared, "--trainer.max_steps=2", f"--images.layouts={shots}"))
    log_dir = cli.trainer.logger.log_dir
    acc = EventAccumulator(log_dir, size_guidance={"images": 0})
    acc.Reload()
    for name in ("hero", "wide"):  # fast.yaml: every 2 steps, so step 0 (untrained) and step 2
        assert [e.step for e in acc.Images(f"layouts/{name}")] == [0, 2]
    # two seeds each: the layout's own (7) and the next, else 0 and 1; at the layout's own size
    for step in ("0000000", "0000002"):
        folder = f"{log_dir}/samples/step={step}"
        assert np.asarray(Image.open(f"{folder}/wide_seed7.png")).shape == (32, 64, 3)
        assert np.asarray(Image.open(f"{folder}/wide_seed8.png")).shape == (32, 64, 3)
        assert np.asarray(Image.open(f"{folder}/hero_seed0.png")).shape[2] == 3
        assert not np.array_equal(np.asarray(Image.open(f"{folder}/hero_seed0.png")),
                                  np.asarray(Image.open(f"{folder}/hero_seed1.png")))
    # the model trained between the two renders, from the same seeds
    assert not np.array_equal(np.asarray(Image.open(f"{log_dir}/samples/step=0000000/hero_seed0.png")),
                              np.asarray(Image.open(f"{log_dir}/samples/step=0000002/hero_seed0.png")))


def test_sample_layouts_with_a_bad_line_stop_the_run_naming_file_and_line(in_tmp, toy_models, toy_prepared):
    path = in_tmp / "shots.jsonl"
    path.write_text(json.dumps({"id": "a", "prompt": "x", "instances": [{"bbox": [0, 0, 500, 10]}]}) + "\n")
    with pytest.raises(ValueError, match=r"--images.layouts: 1 bad lines, e.g. .*shots.jsonl:1"):
        main(fit_args(1, toy_models, toy_prepared, "--trainer.max_steps=1", f"--images.layouts={path}"))
    with pytest.raises(ValueError, match="is not a file"):
        main(fit_args(1, toy_models, toy_prepared, "--trainer.max_steps=1", "--images.layouts=nowhere.jsonl"))
