"""What `mpp studio` does behind its page, without Gradio: load a trained model, render a shot through
`mpp.sampling.generate_one` (the code path of `mpp generate`), keep the shot list, the references and
the `generated.json` report in one output folder, and nothing outside it."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, replace

import numpy as np

from mpp.data.raw import read_image
from mpp.encoders import Encoders
from mpp.export import load_exported
from mpp.filenames import safe_stem
from mpp.generate import load_module
from mpp.layouts import REPORT_NAME, save_generated, write_report
from mpp.sampling import SamplingConfig, generate_one
from mpp.viz import draw_boxes

from .shots import Shot, check_shot, read_shot_list, write_shot_list

__all__ = ["Engine", "Render", "Studio", "load_checkpoint_engine", "load_export_engine", "SHOT_LIST_NAME"]

log = logging.getLogger(__name__)

SHOT_LIST_NAME = "shots.jsonl"
REFERENCES = "references"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class Engine:
    """A trained model and how to sample it: what `mpp generate` builds from a config and checkpoint."""

    model: object  # mpp.nn.MppFlux
    encoders: Encoders
    sampling: SamplingConfig
    guidance: float
    resolution: int  # the side of the training square (frame presets are sized from it)
    source: str  # the checkpoint or export folder, for the report
    buckets: list[tuple[int, int]] | None = None


def load_checkpoint_engine(configs: list[str], ckpt: str, overrides: list[str] | None = None) -> Engine:
    """The model of a stage config (plus overlays) with a training checkpoint's weights, as `mpp generate`
    loads it. A checkpoint of another model is a ValueError naming what does not fit."""
    if not os.path.isfile(ckpt):
        raise ValueError(f"--ckpt_path {ckpt}: no such file")
    module, resolution = load_module(configs, ckpt, overrides)  # a foreign file: ValueError naming it
    return Engine(model=module.model, encoders=module.encoders, sampling=module.sampling,
                  guidance=module.hparams.guidance, resolution=resolution, source=os.path.abspath(ckpt))


def load_export_engine(export_dir: str, *, resolution: int) -> Engine:
    """The model of an export folder (`mpp.export.load_exported`), without Lightning."""
    model, cfg = load_exported(export_dir)
    return Engine(model=model, encoders=Encoders(cfg.encoders), sampling=cfg.sampling, guidance=cfg.guidance,
                  resolution=resolution, source=os.path.abspath(export_dir))


@dataclass
class Render:
    image: np.ndarray  # H×W×3 uint8
    overlay: np.ndarray  # the same with the boxes coloured by α
    alpha: list[float]
    record: dict  # as in generated.json


def cast_gallery(cast_dir: str | None) -> dict[str, list[str]]:
    """Character name → its photos: one subfolder of `cast_dir` per character (as `mpp annotate --cast`)."""
    if not cast_dir:
        return {}
    if not os.path.isdir(cast_dir):
        raise ValueError(f"--cast {cast_dir}: not a folder (give one subfolder of photos per character)")
    cast = {}
    for name in sorted(os.listdir(cast_dir)):
        folder = os.path.join(cast_dir, name)
        if os.path.isdir(folder):
            photos = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(IMAGE_SUFFIXES))
            if photos:
                cast[name] = photos
    if not cast:
        raise ValueError(f"--cast {cast_dir}: no subfolder holds a photo ({', '.join(IMAGE_SUFFIXES)})")
    return cast


class Studio:
    """One output folder (`out_dir`): `shots.jsonl`, `references/`, the rendered images and
    `generated.json`. Every path written is inside it."""

    def __init__(self, engine: Engine, out_dir: str):
        self.engine = engine
        self.out_dir = os.path.abspath(out_dir)
        os.makedirs(os.path.join(self.out_dir, REFERENCES), exist_ok=True)
        self.records: dict[str, dict] = {}
        report = os.path.join(self.out_dir, REPORT_NAME)
        if os.path.exists(report):  # a reopened folder keeps what it rendered before
            try:
                with open(report, encoding="utf-8") as f:
                    self.records = {r["id"]: r for r in json.load(f).get("images", [])}
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{report}: unreadable report of an earlier session ({e}); move it away") from e

    @property
    def shot_list_path(self) -> str:
        return os.path.join(self.out_dir, SHOT_LIST_NAME)

    def new_shot(self, shot_id: str, *, width: int | None = None, height: int | None = None) -> Shot:
        """An empty shot with the model's sampling values."""
        s = self.engine.sampling
        return Shot(id=shot_id, prompt="", width=width or self.engine.resolution,
                    height=height or self.engine.resolution, seed=s.seed, steps=s.steps,
                    layout_guidance=s.layout_guidance, identity_guidance=s.identity_guidance)

    def add_reference(self, path: str) -> str:
        """Copies an image (an upload, a cast photo) into `references/` under a name from its content,
        so the shot list stays valid when the source moves; an unreadable image is a ValueError."""
        read_image(path, os.path.basename(path))  # SampleError (a ValueError) names the file
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()[:12]
        stem, suffix = os.path.splitext(os.path.basename(path))
        target = os.path.join(self.out_dir, REFERENCES, f"{safe_stem(stem, 'reference')}-{digest}{suffix.lower()}")
        if not os.path.exists(target):
            shutil.copyfile(path, target)
        return target

    def check(self, shot: Shot):
        """The layout the shot generates (ValueError: what is wrong with it)."""
        return check_shot(shot, self.out_dir)

    def render(self, shot: Shot, *, seed: int | None = None, name: str | None = None) -> Render:
        """Generates the shot as `mpp generate` would from its line of the shot list (another `seed`
        for a variation, written as `name`), writes its images and updates `generated.json`."""
        layout = self.check(shot if seed is None else replace(shot, seed=seed))
        if name is not None:
            layout.name = safe_stem(name, layout.name)
        e = self.engine
        pixels, alpha, used = generate_one(e.model, e.encoders, layout, sampling=e.sampling, index=0,
                                           guidance=e.guidance)
        record = save_generated(pixels, alpha, layout, used, self.out_dir)
        if seed is None:
            self.records[shot.id] = record
            write_report(self.out_dir, list(self.records.values()), checkpoint=e.source, layouts=self.shot_list_path)
        overlay = draw_boxes(pixels, layout.boxes.cpu(), alpha)  # what save_generated wrote beside the image
        return Render(image=pixels, overlay=overlay, alpha=record["alpha"], record=record)

    def seed_strip(self, shot: Shot, count: int) -> list[Render]:
        """The shot at `count` seeds from its own, side by side (written as `<name>_seed<S>`)."""
        if not 1 <= count <= 16:
            raise ValueError(f"seed variations: give 1 to 16, got {count}")
        return [self.render(shot, seed=shot.seed + k, name=f"{shot.id}_seed{shot.seed + k}") for k in range(count)]

    def save(self, shots: list[Shot]) -> str:
        """Writes the shot list (after checking each shot) to `shots.jsonl`; returns its path."""
        for shot in shots:
            self.check(shot)
        write_shot_list(self.shot_list_path, shots)
        return self.shot_list_path

    def load(self, path: str | None = None) -> tuple[list[Shot], list[str]]:
        """Reads a shot list (default this folder's); references outside the folder are copied in."""
        shots, errors = read_shot_list(path or self.shot_list_path, resolution=self.engine.resolution)
        for shot in shots:
            for box in shot.boxes:
                if box.reference and not os.path.abspath(box.reference).startswith(self.out_dir + os.sep):
                    box.reference = self.add_reference(box.reference)
        return shots, errors
