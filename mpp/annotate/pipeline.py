"""The two passes of `mpp annotate` (see `mpp.annotate`): `analyse` caches, per frame, its
detections, captions and box embeddings under RAW/annotate/work/; `assemble` links, clusters and
writes the raw layout and RAW/annotate/report.json.

Foreground rule: an instance is foreground when its label is one of `foreground` (the phrase the
detector answered, or, for a detector without a vocabulary such as the toy one, the last word of its
caption). Cast linking runs over every instance, so a background prop or a building in the cast
carries a reference while staying `foreground: false`.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from mpp.caption import crop_with_margin
from mpp.data.raw import write_raw_sample

from .cast import Cast
from .clusters import Cluster, cluster, contact_sheet, read_edits, write_clusters
from .frames import Dropped, FrameSettings, frames, list_sources

log = logging.getLogger(__name__)

# what a film or TV team tracks; the detector is queried with these phrases (--vocabulary)
DEFAULT_VOCABULARY = ("person", "animal", "car", "bag", "hat", "phone", "weapon", "chair", "table", "door",
                      "window", "building", "sign")
DEFAULT_FOREGROUND = ("person", "animal")


@dataclass
class AnnotateSettings:
    """Args:
        frames: how frames are sampled from video.
        vocabulary: the phrases the detector is asked for.
        foreground: the labels that make an instance foreground (identity-bearing).
        link_threshold: DINOv2 cosine similarity at or above which a box is linked to a cast photo.
        cluster_distance: cosine distance below which unlinked foreground boxes join one cluster.
        min_cluster: the fewest boxes that make a recurring identity worth a contact-sheet row.
        margin: share of a box's size added on each side of its crop (for the embedding and references).
    """

    frames: FrameSettings = field(default_factory=FrameSettings)
    vocabulary: tuple[str, ...] = DEFAULT_VOCABULARY
    foreground: tuple[str, ...] = DEFAULT_FOREGROUND
    link_threshold: float = 0.6
    cluster_distance: float = 0.3
    min_cluster: int = 3
    margin: float = 0.1

    def __post_init__(self):
        if not self.vocabulary:
            raise ValueError("--vocabulary must name at least one phrase")
        if not -1 <= self.link_threshold <= 1:
            raise ValueError(f"--link_threshold must be in [-1, 1], got {self.link_threshold}")
        if not 0 < self.cluster_distance < 2:
            raise ValueError(f"--cluster_distance must be in (0, 2), got {self.cluster_distance}")
        if self.min_cluster < 2:
            raise ValueError(f"--min_cluster must be >= 2, got {self.min_cluster}")


def work_dir(raw: str) -> str:
    return os.path.join(raw, "annotate", "work")


def _write_json(path: str, value) -> None:
    with open(f"{path}.tmp", "w") as f:
        json.dump(value, f)
    os.replace(f"{path}.tmp", path)


def _source_record(raw: str, source: str) -> str:
    name = os.path.basename(source).replace(os.sep, "_")
    return os.path.join(work_dir(raw), "sources", f"{name}.json")


def analyse_frame(frame, detector, captioner, embed, settings: AnnotateSettings,
                  scene_caption: str | None) -> tuple[dict, torch.Tensor]:
    """Detections, captions and embeddings of one frame: (record, K×D embeddings)."""
    found = detector.detect_all(frame.image, list(settings.vocabulary))
    boxes = [list(d.box) for d in found]
    captions = captioner.caption_regions(frame.image, boxes) if boxes else []
    if scene_caption is None:
        scene_caption = captioner.caption(frame.image)
    embeds = embed([crop_with_margin(frame.image, b, settings.margin) for b in boxes]) if boxes else torch.zeros(0, 1)
    record = {"id": frame.id, "source": frame.source, "time": frame.time, "shot": frame.shot, "caption": scene_caption,
              "width": int(frame.image.shape[1]), "height": int(frame.image.shape[0]),
              "instances": [{"bbox": [round(v, 2) for v in d.box], "label": d.label, "score": round(d.score, 4),
                             "caption": c} for d, c in zip(found, captions, strict=True)]}
    return record, embeds


def analyse(source_path: str, raw: str, *, detector, captioner, embed, settings: AnnotateSettings,
            scene_captions: dict[str, str] | None = None, num_shards: int = 1, shard_index: int = 0) -> dict:
    """Pass 1 over this shard's sources; a source whose record exists was analysed by an earlier run."""
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"--shard_index must be in [0, --num_shards={num_shards}), got {shard_index}")
    sources = list_sources(source_path)[shard_index::num_shards]
    os.makedirs(os.path.join(work_dir(raw), "sources"), exist_ok=True)
    counts = {"sources": len(sources), "analysed": 0, "reused": 0, "frames": 0}
    log.info("annotate: analysing %d sources of %s (shard %d/%d) into %s", len(sources), source_path, shard_index,
             num_shards, work_dir(raw))
    bar = tqdm(sources, desc=f"annotate shard {shard_index}/{num_shards}", unit="source")
    for source in bar:
        record_path = _source_record(raw, source)
        if os.path.exists(record_path):
            counts["reused"] += 1
            continue
        kept, dropped, error = [], [], None
        for item in frames([source], settings.frames):
            if isinstance(item, ValueError):
                error = str(item)
                log.error("annotate: skipping %s", error)
                continue
            if isinstance(item, Dropped):
                dropped.append(asdict(item))
                continue
            frame_json = os.path.join(work_dir(raw), f"{item.id}.json")
            if not os.path.exists(frame_json):
                record, embeds = analyse_frame(item, detector, captioner, embed, settings,
                                               (scene_captions or {}).get(item.id))
                Image.fromarray(item.image).save(os.path.join(work_dir(raw), f"{item.id}.png"))
                save_file({"dino": embeds.float().contiguous()}, os.path.join(work_dir(raw), f"{item.id}.safetensors"))
                _write_json(frame_json, record)
            kept.append(item.id)
            counts["frames"] += 1
            bar.set_postfix(frames=counts["frames"])
        _write_json(record_path, {"source": source, "frames": kept, "dropped": dropped, "error": error})
        counts["analysed"] += 1
    log.info("annotate: %d sources analysed now, %d reused from an earlier run (%d frames)", counts["analysed"],
             counts["reused"], counts["frames"])
    return counts


@dataclass
class Analysed:
    records: list[dict]  # one per kept frame, by id
    embeds: dict[str, torch.Tensor]  # frame id → K×D
    sources: list[dict]


def load_analysis(raw: str, source_path: str) -> Analysed:
    """Every frame pass 1 cached for the sources of `source_path`; ValueError naming what is missing."""
    sources, records, embeds, missing = [], [], {}, []
    for source in list_sources(source_path):
        path = _source_record(raw, source)
        if not os.path.exists(path):
            missing.append(source)
            continue
        with open(path) as f:
            sources.append(json.load(f))
    if missing:
        raise ValueError(f"{len(missing)} sources are not analysed yet (e.g. {missing[0]}): run every shard first")
    for s in sources:
        for fid in s["frames"]:
            with open(os.path.join(work_dir(raw), f"{fid}.json")) as f:
                records.append(json.load(f))
            embeds[fid] = load_file(os.path.join(work_dir(raw), f"{fid}.safetensors"))["dino"]
    return Analysed(records, embeds, sources)


def label_of(inst: dict) -> str:
    return (inst.get("label") or (inst.get("caption") or "").split(" ")[-1]).strip().lower()


def _frame_image(raw: str, fid: str) -> np.ndarray:
    with Image.open(os.path.join(work_dir(raw), f"{fid}.png")) as im:
        return np.asarray(im.convert("RGB"))


def assemble(raw: str, analysed: Analysed, *, cast: Cast | None, settings: AnnotateSettings,
             edits: str | None = None) -> dict:
    """Pass 2: links, clusters, applies `edits` (an edited clusters.json), writes the raw samples,
    RAW/annotate/clusters.json, contact_sheet.png and report.json; returns the report."""
    keys, rows = [], []
    for r in analysed.records:
        for k, _ in enumerate(r["instances"]):
            keys.append(f"{r['id']}#{k}")
            rows.append(analysed.embeds[r["id"]][k])
    embeds = torch.stack(rows) if rows else torch.zeros(0, 1)
    links = cast.link(embeds, settings.link_threshold) if cast is not None else [(None, None, 0.0)] * len(keys)
    link = dict(zip(keys, links, strict=True))
    instance = {f"{r['id']}#{k}": inst for r in analysed.records for k, inst in enumerate(r["instances"])}
    foreground = {key: label_of(inst) in settings.foreground for key, inst in instance.items()}

    edited = read_edits(edits) if edits else []
    unknown = sorted({m for c in edited for m in c.members} - set(keys))
    if unknown:
        raise ValueError(f"--clusters {edits}: {len(unknown)} boxes this analysis does not have, e.g. {unknown[:3]}")
    named = {m: c for c in edited for m in c.members}
    unlinked = [i for i, key in enumerate(keys) if link[key][0] is None and foreground[key] and key not in named]
    found = cluster([keys[i] for i in unlinked], embeds[unlinked] if unlinked else embeds[:0],
                    distance=settings.cluster_distance, min_size=settings.min_cluster)
    clusters = edited + [Cluster(f"c{len(edited) + n:03d}", c.members, c.center) for n, c in enumerate(found, 1)]

    refs = _write_references(raw, cast, clusters, instance, settings.margin)
    samples, dropped_boxes, linked = _write_samples(raw, analysed, link, named, refs, foreground, cast)
    annotate = os.path.join(raw, "annotate")
    write_clusters(os.path.join(annotate, "clusters.json"), clusters)
    contact_sheet(os.path.join(annotate, "contact_sheet.png"), clusters,
                  lambda key: _crop_of(raw, instance, key, settings.margin))
    report = _report(analysed, samples, dropped_boxes, linked, clusters, cast)
    _write_json(os.path.join(annotate, "report.json"), report)
    log.info("annotate: %d samples written to %s (%d frames without an instance, %d near-duplicates dropped), "
             "%d boxes linked to the cast, %d clusters (contact sheet: %s)", report["samples"], raw,
             len(report["frames_without_instances"]), len(report["dropped_frames"]), sum(linked.values()),
             len(clusters), os.path.join(annotate, "contact_sheet.png"))
    return report


def _crop_of(raw: str, instance: dict, key: str, margin: float) -> np.ndarray:
    fid = key.rsplit("#", 1)[0]
    return crop_with_margin(_frame_image(raw, fid), instance[key]["bbox"], margin)


def _write_references(raw: str, cast: Cast | None, clusters: list[Cluster], instance: dict, margin: float) -> dict:
    """Writes RAW/refs/<member>/<photo>.png for the cast and RAW/refs/<name>/<cluster>.png for each
    newly named cluster; returns {(member, photo index) or (name, None): relative path}."""
    refs = {}
    if cast is not None:
        for p, (name, photo) in enumerate(zip(cast.names, cast.photos, strict=True)):
            rel = os.path.join("refs", name, f"{os.path.splitext(os.path.basename(photo))[0]}.png")
            os.makedirs(os.path.join(raw, "refs", name), exist_ok=True)
            Image.fromarray(cast.crops[p]).save(os.path.join(raw, rel))
            refs[(name, p)] = rel
    members = set(cast.members) if cast is not None else set()
    for c in clusters:
        if c.name and not c.drop and c.name not in members and (c.name, None) not in refs:
            rel = os.path.join("refs", c.name, f"{c.id}.png")
            os.makedirs(os.path.join(raw, "refs", c.name), exist_ok=True)
            Image.fromarray(_crop_of(raw, instance, c.center, margin)).save(os.path.join(raw, rel))
            refs[(c.name, None)] = rel
    return refs


def _member_photo(cast: Cast, name: str) -> int:
    return cast.names.index(name)


def _write_samples(raw, analysed: Analysed, link, named, refs, foreground, cast) -> tuple[int, list, dict]:
    samples, dropped, linked = 0, [], {}
    for r in tqdm(analysed.records, desc="annotate: writing samples", unit="frame"):
        instances = []
        for k, inst in enumerate(r["instances"]):
            key = f"{r['id']}#{k}"
            item = {"bbox": inst["bbox"], "caption": inst["caption"], "foreground": foreground[key]}
            edit = named.get(key)
            if edit is not None and edit.drop:
                dropped.append({"box": key, "reason": f"dropped with cluster {edit.id}"})
                continue
            member, photo, sim = link[key]
            if edit is not None and edit.name:
                member = edit.name
                photo = _member_photo(cast, member) if cast is not None and member in cast.members else None
            if member is not None:
                item["reference"] = refs[(member, photo)]
                item["identity"] = member
                linked[member] = linked.get(member, 0) + 1
            instances.append(item)
        if not instances:
            continue
        image = _frame_image(raw, r["id"])
        write_raw_sample(raw, r["id"], image, r["caption"], instances,
                         extra={"source": r["source"], "time": r["time"], "shot": r["shot"]})
        samples += 1
    return samples, dropped, linked


def _report(analysed: Analysed, samples: int, dropped_boxes: list, linked: dict, clusters: list[Cluster],
            cast: Cast | None) -> dict:
    return {
        "frames": len(analysed.records),
        "samples": samples,
        "instances": sum(len(r["instances"]) for r in analysed.records),
        "per_frame": {r["id"]: len(r["instances"]) for r in analysed.records},
        "frames_without_instances": [r["id"] for r in analysed.records if not r["instances"]],
        "dropped_frames": [d for s in analysed.sources for d in s["dropped"]],
        "unreadable_sources": [s["error"] for s in analysed.sources if s["error"]],
        "dropped_boxes": dropped_boxes,
        "linked": dict(sorted(linked.items())),
        "clusters": {c.id: {"size": len(c.members), "name": c.name, "drop": c.drop} for c in clusters},
        "cast": {"members": cast.members if cast else [], "photos": len(cast.names) if cast else 0,
                 "skipped": cast.skipped if cast else []},
    }
