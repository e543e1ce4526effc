"""Toy-world quality: stage 1 with the layout head versus the same training without it (text-only
baseline), each for a fixed CPU budget, evaluated on held-out layouts from another world seed.

    python bench/toy_quality.py [--minutes 15] [--layouts 48] [--eval_seed 1] [--steps 28]

Prints one JSON line: per arm the steps trained, the placement mIoU and success at IoU ≥ 0.5, and
the ratio of the two mIoUs. Each arm runs in .cache/bench/toy_quality/<arm>; the toy models are
the shared ones of configs/toy.yaml.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from mpp.cli import main as fit
from mpp.evaluate import ToyColorDetector, evaluate, load_generated
from mpp.generate import Sampler, generate, load_module, read_layouts
from mpp.toy.scenes import ToyWorld

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = [os.path.join(ROOT, "configs/stage1.yaml"), os.path.join(ROOT, "configs/toy.yaml")]
ARMS = {"layout": [], "text_only": ["--model.heads.use_layout_head=false", "--model.heads.lora_scope=all"]}


def write_layouts(path: str, *, seed: int, count: int, image_size: int = 128) -> None:
    world = ToyWorld(image_size=image_size, seed=seed)
    with open(path, "w") as f:
        for i in range(count):
            scene = world.scene(i)
            f.write(json.dumps({"id": scene.id, "prompt": scene.caption, "instances": [
                {"bbox": list(x.bbox), "caption": x.caption, "color": list(x.color)} for x in scene.instances]}) + "\n")


def run_arm(name: str, flags: list[str], *, minutes: float, layouts_path: str, steps: int) -> dict:
    workdir = os.path.join(ROOT, ".cache/bench/toy_quality", name)
    os.makedirs(workdir, exist_ok=True)
    # absolute paths (each arm runs in its own folder), so the bench prepares its own copy of the data
    paths = [f"--data.root={os.path.join(ROOT, '.cache/bench/toy_quality/data')}",
             f"--data.toy.models_dir={os.path.join(ROOT, '.cache/toy/models')}",
             f"--model.backbone={os.path.join(ROOT, '.cache/toy/models')}",
             f"--data.encoders.flux={os.path.join(ROOT, '.cache/toy/models')}",
             f"--data.encoders.clip_vision={os.path.join(ROOT, '.cache/toy/models/image_encoder')}",
             f"--data.encoders.dino={os.path.join(ROOT, '.cache/toy/models/dino')}"]
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        start = time.perf_counter()
        cli = fit(["fit", *[a for c in CONFIGS for a in ("--config", c)], *paths, *flags,
                   "--trainer.max_steps=1000000", f"--trainer.max_time=00:00:{int(minutes):02d}:{int(minutes % 1 * 60):02d}",
                   "--trainer.enable_progress_bar=false"])
        train_seconds = time.perf_counter() - start
        ckpt = os.path.join(workdir, "runs/checkpoints/stage1/final.ckpt")
        cli.trainer.save_checkpoint(ckpt)
        module, resolution = load_module(CONFIGS, ckpt, [*paths, *flags])
    finally:
        os.chdir(cwd)
    layouts, errors = read_layouts(layouts_path, resolution=resolution)
    if errors:
        raise ValueError(f"bad held-out layouts: {errors}")
    out = os.path.join(workdir, "generated")
    sampler = Sampler(steps=steps, shift=module.sampling.shift, guidance=module.hparams.guidance)
    records = generate(module.model, module.encoders, layouts, out, resolution=resolution, sampler=sampler)
    with open(os.path.join(out, "generated.json"), "w") as f:
        json.dump({"checkpoint": ckpt, "images": records}, f)
    images, scored, _ = load_generated(out, layouts_path)
    result = evaluate(images, scored, ToyColorDetector())
    return {"steps": cli.trainer.global_step, "train_seconds": round(train_seconds, 1), **result}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--minutes", type=float, default=15.0, help="training budget per arm")
    p.add_argument("--layouts", type=int, default=48, help="held-out layouts to generate")
    p.add_argument("--eval_seed", type=int, default=1, help="world seed of the held-out layouts")
    p.add_argument("--steps", type=int, default=28, help="Euler steps per image")
    a = p.parse_args()
    layouts_path = os.path.join(ROOT, ".cache/bench/toy_quality/layouts.jsonl")
    os.makedirs(os.path.dirname(layouts_path), exist_ok=True)
    write_layouts(layouts_path, seed=a.eval_seed, count=a.layouts)
    start = time.perf_counter()
    results = {name: run_arm(name, flags, minutes=a.minutes, layouts_path=layouts_path, steps=a.steps)
               for name, flags in ARMS.items()}
    base = results["text_only"]["miou"]
    print(json.dumps({"minutes_per_arm": a.minutes, **results,
                      "miou_ratio": round(results["layout"]["miou"] / base, 2) if base else None,
                      "total_seconds": round(time.perf_counter() - start, 1)}))


if __name__ == "__main__":
    main()
