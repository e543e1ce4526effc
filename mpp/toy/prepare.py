"""The toy world's dataset: its models built (cached), its scenes written as a raw dataset and
prepared beside them. `ToyData` is what the DataModule's `data.toy` option holds.

    mpp toy prepare OUT --models_dir .cache/toy/models --num_samples 512 [--aspect_ratios '[1, 1.7778, 2.39]']

With several aspect ratios the scenes come in frames of those ratios (`mpp.toy.scenes.frames_for`),
prepared into one bucket per ratio; the toy models stay those of the square world (their codec and
backbone pretraining do not change).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field

from mpp.data.buckets import Buckets
from mpp.data.layout import atomic_write_json, read_prepare_info, same_info_value
from mpp.encoders import EncoderSettings
from mpp.prepare import PrepareResult, prepare_dataset

from .bundle import toy_encoder_settings
from .models import build_toy_models
from .pretrain import DEFAULT_PRETRAIN_STEPS
from .scenes import MAX_BOX, MIN_BOX, ToyWorld, frames_for
from .vision import VISION_PRETRAIN_STEPS

log = logging.getLogger(__name__)


def build_toy_bundle(models_dir, *, image_size: int, seed: int, num_identities: int, min_box: int, max_box: int,
                     pretrain_steps: int, vision_steps: int) -> ToyWorld:
    """Builds (once) the toy models of the square, fully described world of these characters and
    boxes, as a toy dataset of them is prepared with; returns that world."""
    world = bundle_world(image_size=image_size, seed=seed, num_identities=num_identities, min_box=min_box,
                         max_box=max_box)
    build_toy_models(models_dir, world=world, pretrain_steps=pretrain_steps, vision_steps=vision_steps)
    return world


def bundle_world(*, image_size: int, seed: int, num_identities: int, min_box: int, max_box: int) -> ToyWorld:
    """The world a toy bundle is built for: square, every character described."""
    return ToyWorld(image_size=image_size, seed=seed, num_identities=num_identities, min_box=min_box, max_box=max_box)


def prepare_toy(output: str, *, models_dir: str, num_samples: int = 512, seed: int = 0, image_size: int = 128,
                pretrain_steps: int = DEFAULT_PRETRAIN_STEPS, vision_steps: int = 0, num_identities: int = 8,
                encoders: EncoderSettings | None = None, num_shards: int = 1,
                shard_index: int = 0, progress: bool = True, aspect_ratios: list[float] | None = None,
                describe_prob: float = 1.0, min_box: int = MIN_BOX, max_box: int = MAX_BOX) -> PrepareResult:
    """Builds the toy models (cached; the backbone pretrained as a text-to-image model for
    `pretrain_steps`, the vision encoders to see identity for `vision_steps`) and a toy dataset of a
    world with `num_identities` characters: raw scenes under output/source, in frames of
    `aspect_ratios` (default square), each character's looks named in its caption with probability
    `describe_prob`, boxes of `min_box` to `max_box` pixels a side, prepared beside them in one bucket
    per ratio. The models are those of the square world of these characters and boxes, every
    character described."""
    ratios = [float(a) for a in aspect_ratios or [1.0]]
    world = build_toy_bundle(models_dir, image_size=image_size, seed=seed, num_identities=num_identities,
                             min_box=min_box, max_box=max_box, pretrain_steps=pretrain_steps,
                             vision_steps=vision_steps)
    world = ToyWorld(**world.config, describe_prob=describe_prob,
                     frames=None if ratios == [1.0] else frames_for(image_size, ratios))
    buckets = Buckets(aspect_ratios=ratios, portrait=False)
    source = os.path.join(output, "source")
    marker = os.path.join(source, "toy.json")
    wanted = {"num_samples": num_samples, "seed": seed, "image_size": image_size}
    if num_identities != 8:
        wanted["num_identities"] = num_identities
    if ratios != [1.0]:
        wanted["aspect_ratios"] = ratios
    if describe_prob != 1.0:
        wanted["describe_prob"] = describe_prob
    if (min_box, max_box) != (MIN_BOX, MAX_BOX):
        wanted["boxes"] = [min_box, max_box]
    if os.path.exists(marker):
        with open(marker) as f:
            existing = json.load(f)
        if existing != wanted:
            raise ValueError(f"{marker}: toy data was written with {existing}, asked for {wanted}; use another "
                             "output folder")
    else:
        shutil.rmtree(source, ignore_errors=True)
        world.write_raw(source, num_samples)
        atomic_write_json(marker, wanted)
    encoders = encoders or toy_encoder_settings(models_dir)
    existing = read_prepare_info(output)
    sizes = [list(b) for b in buckets.resolve(image_size)]
    if existing is not None and (not same_info_value("encoders", existing.get("encoders"), encoders.identity())
                                 or existing.get("buckets") != sizes):
        # the toy encoders were rebuilt (a new bundle format, another codec fit), or the data was prepared
        # before buckets: the tensors are stale
        log.warning("%s: toy data was prepared with other toy models or buckets; preparing it again", output)
        for name in os.listdir(output):
            if name != "source":
                path = os.path.join(output, name)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    return prepare_dataset(source, output, encoders=encoders, resolution=image_size, buckets=buckets,
                           num_shards=num_shards, shard_index=shard_index, progress=progress)


@dataclass
class ToyData:
    """Build the toy world's models and dataset when the data folder does not hold them yet.

    Args:
        models_dir: where the toy encoders and backbone are cached.
        num_samples: scenes to generate.
        seed: world seed (same seed, same dataset bit for bit).
        image_size: side of the square toy images.
        pretrain_steps: text-to-image pretraining of the toy backbone (it stands in for FLUX's
            pretraining; 0 leaves it random).
        vision_steps: pretraining of the toy CLIP vision and DINOv2 encoders to see identity
            (they stand in for the real ones; 0 leaves them random).
        num_identities: the world's characters (colour × shape × texture combinations; enough of
            them that each attribute is seen in many combinations, so a reference can teach an
            unseen one).
        aspect_ratios: the frames' aspect ratios (width / height ≥ 1), each scene in one of them and
            each prepared into its own bucket; `[1.0]` (default): square scenes only.
        describe_prob: the share of characters' appearances whose caption names their colour and
            texture as well as their shape; the rest name only the shape ("a cross"), leaving the
            looks to the reference (`mpp.toy.scenes`). The toy models are built from the fully
            described world whatever this is.
        min_box: the shortest side of a scene's boxes, in pixels (the models are built for the
            world of these boxes, so another size builds other models in `models_dir`).
        max_box: the longest.
    """

    models_dir: str = ".cache/toy/models"
    num_samples: int = 512
    seed: int = 0
    image_size: int = 128
    pretrain_steps: int = DEFAULT_PRETRAIN_STEPS
    vision_steps: int = VISION_PRETRAIN_STEPS
    num_identities: int = 32
    aspect_ratios: list[float] = field(default_factory=lambda: [1.0])
    describe_prob: float = 1.0
    min_box: int = MIN_BOX
    max_box: int = MAX_BOX

    def bundle_world(self) -> ToyWorld:
        """The world of this dataset's toy bundle."""
        return bundle_world(image_size=self.image_size, seed=self.seed, num_identities=self.num_identities,
                            min_box=self.min_box, max_box=self.max_box)

    def prepare(self, root: str, encoders: EncoderSettings) -> None:
        """Builds (or completes) the toy dataset in `root`, encoded with `encoders`."""
        result = prepare_toy(root, models_dir=self.models_dir, num_samples=self.num_samples, seed=self.seed,
                             image_size=self.image_size, pretrain_steps=self.pretrain_steps,
                             vision_steps=self.vision_steps, num_identities=self.num_identities, encoders=encoders,
                             aspect_ratios=self.aspect_ratios, describe_prob=self.describe_prob,
                             min_box=self.min_box, max_box=self.max_box)
        if result.errors:
            raise ValueError(f"toy preparation failed for {len(result.errors)} samples: {result.errors[:3]}")
