"""Toy-world proof of the three stages: stage 1 → stage 2 (from stage 1) → stage 3 (from stage 2),
against a control that continues stage 1 from the same checkpoint, each for a fixed number of
optimizer steps (so the figures do not depend on what else runs on the machine).

    python bench/toy_stages.py [--steps1 3600] [--steps2 1800] [--steps3 1000] [--control_steps 3600]
                               [--layouts 256] [--eval_seed 1] [--unseen 8] [--eval_describe 0] [--steps 28]
                               [--workdir .cache/bench/toy_stages] [--models .cache/bench/toy_stages_models]
                               [-- extra CLI overrides for every arm]

The recipe is the stage configs with configs/toy.yaml (and its configs/toy/stage{N}.yaml), exactly what
`./train.sh --config configs/toy.yaml` runs: the bench adds only step budgets, its folders and its
held-out layouts (`arm_args`; tests/bench/test_toy_stages.py checks that nothing else differs). The
toy overlay's world is the one where the reference carries the looks: 120 characters, half of their
training appearances captioned by shape alone ("a hexagon"), boxes of 48-96 px. The bench's toy
bundle is built for it in `--models` on the first run (about 10 minutes, in stage 1's time).
Held-out layouts are scenes of layout seed `--eval_seed` whose
characters are `--unseen` colour × shape × texture combinations that no training scene shows (each
colour, shape and texture is seen in training, never in that combination), each given by its
reference image and named by its shape alone (`--eval_describe 0`), so its looks come from the
reference; background elements have their caption only. Every arm generates them and is scored on:

- `miou`, `success_at_0.5`: placement of every instance (the toy colour detector);
- `identity_accuracy`: the referenced characters' colour, shape and texture all right, by the toy
  identity judge (`mpp.toy.judge`, a CNN trained on renders, not the encoder the loss uses; top-1
  over all 160 combinations, chance 1/160), each attribute's accuracy, and `looks_accuracy`
  (colour and texture both right: what only the reference gives, the caption naming the shape);
- `dino_similarity`: toy-DINOv2 cosine of the generated box to its reference;
- `alpha_auc`, `alpha_mean`, `alpha_fg_ratio`: α of each held-out instance (foreground = referenced).

The control gets twice stage 2's steps by default: a stage-2 step costs about 1.7 stage-1 steps of
CPU time (the identity term's own forward, decode and DINOv2), so the control has at least stage 2's
compute. Stage 2 trains only its modulation head and every arm trains at 1e-3, as configs/toy.yaml
and configs/toy/stage2.yaml say. Prints one JSON line
`{"arms": {"stage1": …, "stage1_control": …, "stage2": …, "stage3": …}, "training": …, …}` (training:
each arm's steps, and the first and last fifth of its TensorBoard curves) and writes each arm's
generated images (with box overlays) under <workdir>/<arm>/generated. An arm folder that already
holds checkpoints (an earlier or killed run) is refused: rerun in another --workdir.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import sys
import time
from dataclasses import replace

import numpy as np
import torch
import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from toy_quality import write_layouts  # noqa: E402

from mpp.cli import main as fit  # noqa: E402
from mpp.evaluate import ToyColorDetector, evaluate  # noqa: E402
from mpp.generate import load_module  # noqa: E402
from mpp.layouts import load_generated, read_layouts, write_report  # noqa: E402
from mpp.losses import auc  # noqa: E402
from mpp.sampling import generate  # noqa: E402
from mpp.toy.codec import PatchCodec  # noqa: E402
from mpp.toy.judge import judge_instances, load_or_train_judge  # noqa: E402
from mpp.toy.scenes import ToyWorld, all_identities  # noqa: E402

log = logging.getLogger("bench.toy_stages")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = os.path.join(ROOT, "configs/toy.yaml")
with open(TOY) as _f:
    TOY_WORLD = yaml.safe_load(_f)["data"]["toy"]
CURVES = ("loss/flow_matching", "loss/dino_identity", "metrics/dino_similarity_mean", "metrics/alpha_mean",
          "metrics/alpha_fg_ratio", "metrics/alpha_auc", "loss/alpha_bce", "metrics/feedback_magnitude")


def configs(stage: int) -> list[str]:
    return [os.path.join(ROOT, f"configs/stage{stage}.yaml"), TOY]


def training_world() -> ToyWorld:
    """The world configs/toy.yaml trains on (its characters and boxes)."""
    return ToyWorld(seed=TOY_WORLD["seed"], num_identities=TOY_WORLD["num_identities"],
                    describe_prob=TOY_WORLD["describe_prob"], min_box=TOY_WORLD["min_box"],
                    max_box=TOY_WORLD["max_box"])


def unseen_cast(count: int, seed: int) -> list[str]:
    """`count` characters that the training world never shows, drawn with `seed`."""
    seen = {i.name for i in training_world().identities}
    rest = [i.name for i in all_identities() if i.name not in seen]
    rng = np.random.default_rng((seed, 0xCA57))
    return sorted(rest[i] for i in rng.choice(len(rest), size=count, replace=False))


def _paths(root: str, models: str) -> list[str]:
    return [f"--data.root={os.path.join(root, 'data')}", f"--data.toy.models_dir={models}",
            f"--model.backbone={models}",
            f"--data.encoders.flux={models}", f"--data.encoders.clip_vision={os.path.join(models, 'image_encoder')}",
            f"--data.encoders.dino={os.path.join(models, 'dino')}"]


def check_fresh_arm(workdir: str) -> None:
    """Refuses an arm folder that already holds checkpoints (an earlier or killed run of the bench):
    the new run would write beside them, and `final.ckpt` could be the old run's."""
    found = glob.glob(os.path.join(glob.escape(workdir), "**", "*.ckpt"), recursive=True)
    if found:
        raise ValueError(f"{workdir} already holds {len(found)} checkpoints of an earlier run (e.g. {found[0]}); "
                         "give another --workdir (its prepared data and judge are rebuilt) or delete that folder")


def arm_args(stage: int, max_steps: int, *, root: str, models: str, ckpt: str | None, extra: list[str]) -> list[str]:
    """The `fit` arguments of an arm: the recipe (`configs(stage)`), the bench's folders, the step
    budget, the checkpoint it starts from, and the `--` overrides given to the bench (none by default)."""
    return ["fit", *[a for c in configs(stage) for a in ("--config", c)], *_paths(root, models),
            f"--trainer.max_steps={max_steps}", *([f"--ckpt_path={ckpt}"] if ckpt else []), *extra]


def train(name: str, stage: int, max_steps: int, *, root: str, models: str, ckpt: str | None,
          extra: list[str]) -> dict:
    """Fits `stage` in <root>/<name> up to optimizer step `max_steps` (a same-stage `ckpt` resumes at
    its step; a previous stage's starts from its weights at step 0); saves final.ckpt there."""
    workdir = os.path.join(root, name)
    check_fresh_arm(workdir)
    os.makedirs(workdir, exist_ok=True)
    log.info("%s: stage %d up to step %d%s", name, stage, max_steps, f" from {ckpt}" if ckpt else "")
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        start = time.perf_counter()
        cli = fit(arm_args(stage, max_steps, root=root, models=models, ckpt=ckpt, extra=extra))
        seconds = time.perf_counter() - start
        final = os.path.join(workdir, "final.ckpt")
        cli.trainer.save_checkpoint(final)
    finally:
        os.chdir(cwd)
    return {"stage": stage, "ckpt": final, "steps": cli.trainer.global_step, "train_seconds": round(seconds, 1),
            "logdir": os.path.join(workdir, cli.trainer.logger.log_dir)}


def curves(logdir: str) -> dict:
    """First and last fifth (means) of each logged training curve of CURVES."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(logdir, size_guidance={"scalars": 0})
    acc.Reload()
    out = {}
    for tag in CURVES:
        if tag not in acc.Tags()["scalars"]:
            continue
        values = [e.value for e in acc.Scalars(tag)]
        k = max(1, len(values) // 5)
        out[tag] = {"first": round(float(np.mean(values[:k])), 4), "last": round(float(np.mean(values[-k:])), 4),
                    "points": len(values)}
    return out


def score(arm: dict, name: str, *, root: str, models: str, layouts_path: str, judge, steps: int,
          extra: list[str]) -> dict:
    log.info("%s: generating and scoring the held-out layouts", name)
    module, resolution = load_module(configs(arm["stage"]), arm["ckpt"], [*_paths(root, models), *extra])
    layouts, errors = read_layouts(layouts_path, resolution=resolution)
    if errors:
        raise ValueError(f"bad held-out layouts: {errors}")
    out = os.path.join(root, name, "generated")
    sampling = replace(module.sampling, steps=steps, seed=0)
    records = generate(module.model, module.encoders, layouts, out, sampling=sampling,
                       guidance=module.hparams.guidance)
    write_report(out, records, checkpoint=arm["ckpt"], layouts=layouts_path)
    images, scored, references = load_generated(out, layouts_path)
    result = evaluate(images, scored, ToyColorDetector(), references=references, encoders=module.encoders)
    result.update(judge_instances(judge, images, scored))
    alphas, roles = [], []
    for record in records:
        for inst, a in zip(scored[record["id"]]["instances"], record["alpha"], strict=True):
            alphas.append(a)
            roles.append(bool(inst.get("reference")))
    alphas, roles = torch.tensor(alphas), torch.tensor(roles)
    area = auc(alphas, roles)
    result.update({"alpha_auc": None if area is None else round(float(area), 4),
                   "alpha_mean": round(float(alphas.mean()), 4),
                   "alpha_fg_ratio": round(float((alphas > 0.5).float().mean()), 4),
                   "steps": arm["steps"], "train_seconds": arm["train_seconds"]})
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}


def judge_on_truth(judge, codec, world: ToyWorld, count: int) -> dict:
    """The judge on the held-out scenes themselves, through the codec: the ceiling of what a generator can score."""
    from mpp.toy.vision import codec_round_trip, to_tensor

    scenes = [world.scene(i) for i in range(count)]
    decoded = codec_round_trip(codec, to_tensor(np.stack([s.image for s in scenes])))
    images = {s.id: ((x.permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
              for s, x in zip(scenes, decoded, strict=True)}
    n = world.image_size
    layouts = {s.id: {"instances": [{"bbox": [v / n for v in inst.bbox], "identity": inst.identity}
                                    for inst in s.instances]} for s in scenes}
    return judge_instances(judge, images, layouts)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps1", type=int, default=3600, help="stage 1's optimizer steps")
    p.add_argument("--steps2", type=int, default=1800, help="stage 2's optimizer steps")
    p.add_argument("--steps3", type=int, default=1000, help="stage 3's optimizer steps")
    p.add_argument("--control_steps", type=int, default=None,
                   help="the control's steps after stage 1 (default: 2 × --steps2)")
    p.add_argument("--layouts", type=int, default=256, help="held-out layouts to generate")
    p.add_argument("--eval_seed", type=int, default=1, help="layout seed of the held-out scenes")
    p.add_argument("--unseen", type=int, default=8, help="unseen characters in the held-out scenes")
    p.add_argument("--eval_describe", type=float, default=0.0,
                   help="the same for the held-out layouts (0: each unseen character's looks come from its "
                        "reference only)")
    p.add_argument("--steps", type=int, default=28, help="Euler steps per image")
    p.add_argument("--workdir", default=os.path.join(ROOT, ".cache/bench/toy_stages"))
    p.add_argument("--models", default=os.path.join(ROOT, ".cache/bench/toy_stages_models"),
                   help="toy model bundle for the bench's world (built there on the first run)")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads")
    p.add_argument("overrides", nargs="*", help="CLI overrides for every arm, after --")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(a.threads)
    root, models = os.path.abspath(a.workdir), os.path.abspath(a.models)
    os.makedirs(root, exist_ok=True)
    start = time.perf_counter()
    cast = unseen_cast(a.unseen, a.eval_seed)
    world = ToyWorld(seed=a.eval_seed, cast=cast, describe_prob=a.eval_describe, min_box=TOY_WORLD["min_box"],
                     max_box=TOY_WORLD["max_box"])
    layouts_path = os.path.join(root, "layouts.jsonl")
    write_layouts(layouts_path, seed=a.eval_seed, count=a.layouts, world=world)

    runs = {}
    control = 2 * a.steps2 if a.control_steps is None else a.control_steps
    runs["stage1"] = train("stage1", 1, a.steps1, root=root, models=models, ckpt=None, extra=a.overrides)
    runs["stage1_control"] = train("stage1_control", 1, a.steps1 + control, root=root, models=models,
                                   ckpt=runs["stage1"]["ckpt"], extra=a.overrides)
    runs["stage2"] = train("stage2", 2, a.steps2, root=root, models=models, ckpt=runs["stage1"]["ckpt"],
                           extra=a.overrides)
    runs["stage3"] = train("stage3", 3, a.steps3, root=root, models=models, ckpt=runs["stage2"]["ckpt"],
                           extra=a.overrides)

    codec = PatchCodec.from_pretrained(os.path.join(models, "vae"))
    judge, judge_report = load_or_train_judge(os.path.join(root, "judge.safetensors"), codec)
    arms = {name: score(run, name, root=root, models=models, layouts_path=layouts_path, judge=judge, steps=a.steps,
                        extra=a.overrides) for name, run in runs.items()}
    s1, s2, s3, ctl = arms["stage1"], arms["stage2"], arms["stage3"], arms["stage1_control"]
    summary = {
        "alpha_auc_stage1": s1["alpha_auc"],
        "alpha_fg_ratio_change_1_to_2": round(s2["alpha_fg_ratio"] - s1["alpha_fg_ratio"], 4),
        "identity_gain_stage2_vs_control": round(s2.get("identity_accuracy", 0) - ctl.get("identity_accuracy", 0), 4),
        "looks_gain_stage2_vs_control": round(s2.get("looks_accuracy", 0) - ctl.get("looks_accuracy", 0), 4),
        "miou_stage2_minus_control": round(s2["miou"] - ctl["miou"], 4),
        "identity_stage3_minus_stage2": round(s3.get("identity_accuracy", 0) - s2.get("identity_accuracy", 0), 4),
    }
    print(json.dumps({"arms": arms, "summary": summary,
                      "training": {name: {"steps": r["steps"], "curves": curves(r["logdir"])}
                                   for name, r in runs.items()},
                      "judge": {"renders": judge_report,
                                "heldout_scenes": judge_on_truth(judge, codec, world, a.layouts)},
                      "unseen_cast": cast, "world": TOY_WORLD, "eval_describe": a.eval_describe,
                      "steps": [a.steps1, a.steps2, a.steps3, control],
                      "overrides": a.overrides, "total_seconds": round(time.perf_counter() - start, 1)}))


if __name__ == "__main__":
    main()
