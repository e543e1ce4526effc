"""`mpp annotate FRAMES_OR_VIDEOS RAW --cast CAST_DIR [...]`: footage and a cast in, the raw layout out.

    mpp annotate footage/ raw/ --cast cast/                                   # Grounding DINO, Florence-2, DINOv2
    mpp annotate footage/ raw/ --cast cast/ --num_shards 4 --shard_index 0    # analysis only, one of 4
    mpp annotate footage/ raw/ --cast cast/                                   # then: assemble (reuses the analysis)
    mpp annotate footage/ raw/ --cast cast/ --clusters raw/annotate/clusters.json   # after editing the sheet
    mpp annotate toy_video.mp4 raw/ --cast toy_cast/ --detector toy --captioner toy \\
        --captioner.model .cache/toy/models --dino .cache/toy/models/dino --foreground square,circle,cross,hexagon

See `mpp.annotate` for the two passes and `mpp.annotate.pipeline` for the foreground rule. Exit
status 1 when a source could not be read or a frame had no instance (the report names them), else 0.
"""

from __future__ import annotations

import argparse
import json
import logging

from mpp.caption import load_captioner
from mpp.detect import DetectSettings, load_detector
from mpp.encoders import EncoderSettings, Encoders, parse_dtype
from mpp.toy.captioner import load_toy_captioner
from mpp.toy.detector import ToyDetector

from .cast import dino_embedder, load_cast
from .frames import FrameSettings
from .pipeline import DEFAULT_FOREGROUND, DEFAULT_VOCABULARY, AnnotateSettings, analyse, assemble, load_analysis

log = logging.getLogger("mpp.annotate")


def _phrases(text: str) -> tuple[str, ...]:
    return tuple(p.strip().lower() for p in text.split(",") if p.strip())


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mpp annotate", description=__doc__.split("\n")[0])
    p.add_argument("source", metavar="FRAMES_OR_VIDEOS", help="a video file, an image, or a folder of them")
    p.add_argument("raw", metavar="RAW", help="the raw layout to write (mpp.prepare's input)")
    p.add_argument("--cast", help="folder with one subfolder of photos per character or prop")
    p.add_argument("--clusters", help="an edited RAW/annotate/clusters.json to apply")
    p.add_argument("--scene_captions",
                   help="JSONL of {id, prompt or caption}: scene captions instead of the captioner's")
    p.add_argument("--detector", default="grounding-dino", choices=["grounding-dino", "owlv2", "toy"])
    p.add_argument("--detector.model", dest="detector_model", help="hub id or folder of the detector")
    p.add_argument("--detector.score_threshold", dest="score_threshold", type=float, default=0.3)
    p.add_argument("--detector.nms_iou", dest="nms_iou", type=float, default=0.5)
    p.add_argument("--detector.min_box", dest="min_box", type=float, default=16.0, help="pixels, shorter side")
    p.add_argument("--captioner", default="florence2", choices=["florence2", "blip", "toy"])
    p.add_argument("--captioner.model", dest="captioner_model",
                   help="hub id or folder of the captioner (toy: the toy model bundle, whose judge names the looks)")
    p.add_argument("--dino", default="facebook/dinov2-large", help="DINOv2 hub id or folder (cast linking)")
    p.add_argument("--vocabulary", type=_phrases, default=DEFAULT_VOCABULARY, help="comma-separated phrases")
    p.add_argument("--foreground", type=_phrases, default=DEFAULT_FOREGROUND,
                   help="comma-separated labels that make an instance foreground")
    p.add_argument("--link_threshold", type=float, default=AnnotateSettings.link_threshold)
    p.add_argument("--cluster_distance", type=float, default=AnnotateSettings.cluster_distance)
    p.add_argument("--min_cluster", type=int, default=AnnotateSettings.min_cluster)
    p.add_argument("--stride", type=float, default=FrameSettings.stride, help="seconds between frames within a shot")
    p.add_argument("--cut_threshold", type=float, default=FrameSettings.cut_threshold)
    p.add_argument("--dup_threshold", type=float, default=FrameSettings.dup_threshold)
    p.add_argument("--num_shards", type=int, default=1)
    p.add_argument("--shard_index", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    return p


def build_detector(a):
    if a.detector == "toy":
        return ToyDetector(min_box=max(1, int(a.min_box)))
    return load_detector(a.detector, DetectSettings(model=a.detector_model, score_threshold=a.score_threshold,
                                                    nms_iou=a.nms_iou, min_box=a.min_box, device=a.device,
                                                    dtype=a.dtype))


def build_captioner(a):
    if a.captioner != "toy":
        return load_captioner(a.captioner, a.captioner_model, device=a.device, dtype=a.dtype)
    if not a.captioner_model:
        raise ValueError("--captioner toy needs --captioner.model: the toy model bundle (e.g. .cache/toy/models)")
    return load_toy_captioner(a.captioner_model)


def read_scene_captions(path: str | None) -> dict[str, str]:
    if not path:
        return {}
    out = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                out[str(row["id"])] = str(row.get("caption", row.get("prompt")))
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"--scene_captions {path}:{n}: needs 'id' and 'prompt' or 'caption' ({e})") from e
    return out


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    settings = AnnotateSettings(
        frames=FrameSettings(stride=a.stride, cut_threshold=a.cut_threshold, dup_threshold=a.dup_threshold),
        vocabulary=a.vocabulary, foreground=a.foreground, link_threshold=a.link_threshold,
        cluster_distance=a.cluster_distance, min_cluster=a.min_cluster)
    log.info("annotate: loading the detector (%s), the captioner (%s) and DINOv2 (%s)", a.detector, a.captioner, a.dino)
    detector, captioner = build_detector(a), build_captioner(a)
    encoders = Encoders(EncoderSettings(dino=a.dino), device=a.device, dtype=parse_dtype(a.dtype, "--dtype"))
    embed = dino_embedder(encoders)
    analyse(a.source, a.raw, detector=detector, captioner=captioner, embed=embed, settings=settings,
            scene_captions=read_scene_captions(a.scene_captions), num_shards=a.num_shards, shard_index=a.shard_index)
    if a.num_shards > 1:
        log.info("annotate: shard %d/%d analysed; once every shard is, run without --num_shards to assemble",
                 a.shard_index, a.num_shards)
        return 0
    cast = load_cast(a.cast, detector, list(settings.vocabulary), embed) if a.cast else None
    report = assemble(a.raw, load_analysis(a.raw, a.source), cast=cast, settings=settings, edits=a.clusters)
    return 1 if report["unreadable_sources"] or report["frames_without_instances"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
