"""`mpp import coco|layoutsam|yolo SRC RAW`: the field's layout datasets → the raw layout (DESIGN.md section 2),
which `python -m mpp.prepare run RAW OUT` then prepares like any other raw folder.

    mpp import coco annotations/instances_val2017.json RAW --images val2017 \\
        [--captions annotations/captions_val2017.json]
    mpp import layoutsam layoutsam_train.jsonl RAW --images SA1B_DIR [--region_caption detail|short]
    mpp import yolo DATASET RAW [--names data.yaml|classes.txt]
    every format: [--min_box PX] [--box_tolerance PX] [--keep_empty] [--ext .png|.jpg|.webp]
                  [--num_shards K --shard_index I] [--quiet]

What each format gives (one sample per image; its id is the image's path below its folder without the
extension, "/" → "_"):
- COCO (instances JSON, bbox xywh pixels, read through `pycocotools.coco.COCO`): instance caption = the
  category name verbatim ("person"), as COCO-trained layout models phrase it; `iscrowd` annotations are
  left out (counted). Scene caption: the image's first caption in `--captions` (a COCO captions file),
  else the instance captions joined ("person, dog and car"). Images: `--images DIR` (default the JSON's
  folder) / `file_name`.
- LayoutSAM (CreatiLayout), one record a JSONL line or a JSON list, in a file or a folder of them; both
  published forms: the training set's `{"image_path", "metadata": {"image_info": {"file_name", "width",
  "height"}, "global_caption", "bbox_info": [{"bbox": xyxy px, "description", "detail_description"}]}}`
  (or those keys at the top) and the benchmark's flat `{"file_name", "width", "height", "global_caption",
  "bbox_list", "region_captions", "detail_region_captions"}` (lists as JSON or Python literals in
  strings). Instance caption: the dense `detail_description` (`--region_caption short`: the short
  `description`); the other one is kept in the instance as `short_caption` / `detail_caption`.
- YOLO (Ultralytics' layout: `SRC/images/**` and `SRC/labels/**.txt` mirrored; `class cx cy w h`
  normalized; a segmentation polygon line counts as its bounding box): class names from `--names`, else
  SRC's data.yaml / dataset.yaml (`names`: a list or {id: name}) or classes.txt. An image without a
  label file has no instances (YOLO's background images). Scene caption: the instance captions joined.

Bad input (each named by file and annotation id / line in the log and in the report, and skipped; the
good samples are still written):
- a box outside its image by more than `--box_tolerance` px (default 1: coordinate rounding) or without
  area: that instance is dropped (a box that misses the image is a wrong box; clipping it would train on
  a wrong layout); one within the tolerance is clamped to the image (counted);
- an annotation of an unknown image id or category, a malformed annotation, label line or record: dropped;
- a missing or unreadable image, or one whose size disagrees with the declared width/height in aspect
  ratio: the sample is skipped (same aspect ratio: the boxes are scaled to the file, counted `rescaled`);
- malformed JSON: a LayoutSAM record (JSONL line) or file is skipped; a COCO SRC or `--captions` file
  that cannot be read as a whole is a ValueError naming it and the line.
A sample without instances is not written (counted `empty`; `--keep_empty` writes it); one whose
instances were all dropped is a problem itself (counted `skipped`). Boxes thinner than `--min_box` px
are left out (counted `small`).

Images are re-encoded as `--ext` (default .png: lossless; .jpg re-encodes at PIL's default quality).
Resumable: a sample whose caption file exists (`mpp.data.raw.raw_sample_done`) is skipped; shardable:
`--num_shards K --shard_index I` writes samples i ≡ I (mod K) of the sorted ids, and problems that belong
to no sample are reported by shard 0. `RAW/import_report.json` (sharded: `import_report.shard-I-of-K.json`)
holds the counts and every problem, including those found by earlier runs in samples now done. Exit status
1 when anything was dropped or skipped, 0 otherwise.

The reverse: `raw_to_coco` (instances and captions JSON), `raw_to_layoutsam` (records), `raw_to_yolo`.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import json
import logging
import math
import os
import shutil
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import yaml
from PIL import Image
from pycocotools.coco import COCO
from tqdm import tqdm

from mpp.data.raw import IMAGE_EXTS, SampleError, list_sample_ids, raw_sample_done, read_image, write_raw_sample

log = logging.getLogger(__name__)

SOURCE_IMAGE_EXTS = (*IMAGE_EXTS, ".bmp", ".tif", ".tiff")
ASPECT_TOLERANCE = 0.01  # a declared size and its file agree when their aspect ratios differ less than this
YOLO_NAME_FILES = ("data.yaml", "dataset.yaml", "classes.txt", "obj.names")
DECIMALS = 4  # pixel coordinates written to the raw layout are rounded to this many decimals


@dataclass
class Region:
    """One instance as the source gives it, before it meets its image."""
    bbox: list[float]  # xyxy in the units of its sample's frame
    caption: str
    where: str  # names it in a problem: "annotation 17", "labels/a.txt line 3"
    extra: dict = field(default_factory=dict)  # more keys for the raw instance


@dataclass
class Candidate:
    """One sample as the source gives it."""
    id: str
    image_path: str
    file: str  # the annotation file it comes from
    where: str  # names it in that file: "image 42", "line 7"
    regions: list[Region]
    caption: str | None = None  # None: the instance captions joined
    frame: tuple[float, float] | None = None  # (width, height) the boxes are given in; None: the file's pixels
    normalized: bool = False  # boxes in [0, 1] of the image (YOLO)
    dropped: int = 0  # regions the source parsing dropped (each a problem)
    source: dict = field(default_factory=dict)  # kept in the caption file as "source"


@dataclass
class Options:
    min_box: float = 0.0
    box_tolerance: float = 1.0
    keep_empty: bool = False
    ext: str = ".png"
    num_shards: int = 1
    shard_index: int = 0
    progress: bool = True

    def check(self) -> None:
        if self.num_shards < 1:
            raise ValueError(f"--num_shards must be >= 1, got {self.num_shards}")
        if not 0 <= self.shard_index < self.num_shards:
            raise ValueError(f"--shard_index must lie in [0, --num_shards={self.num_shards}), got {self.shard_index}")
        if self.ext.lower() not in IMAGE_EXTS:
            raise ValueError(f"--ext must be one of {', '.join(IMAGE_EXTS)}, got {self.ext!r}")
        if self.min_box < 0 or self.box_tolerance < 0:
            raise ValueError(f"--min_box and --box_tolerance must be >= 0, got {self.min_box} and {self.box_tolerance}")


@dataclass
class Parsed:
    candidates: list[Candidate]
    problems: list[dict]
    counts: Counter = field(default_factory=Counter)  # about the whole source: images, annotations, crowd, ...


# ------------------------------------------------------------------------------------------ shared helpers

def problem(file: str, where: str, message: str, sample: str | None = None) -> dict:
    return {"file": file, "where": where, "sample": sample, "problem": message}


def describe(p: dict) -> str:
    return f"{p['file']}: {p['where']}: {p['problem']}"


def sample_id_for(relpath: str) -> str:
    """The raw sample id of an image at `relpath` below its folder: the path without its extension, "/" → "_"."""
    stem = os.path.splitext(relpath.replace("\\", "/").strip("/"))[0]
    return stem.replace("/", "_")


def four_numbers(value) -> list[float] | None:
    if not (isinstance(value, (list, tuple)) and len(value) == 4):
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return None
    numbers = [float(v) for v in value]
    return numbers if all(math.isfinite(v) for v in numbers) else None


def join_captions(captions: list[str]) -> str:
    """The scene caption of a sample without one: its distinct instance captions, in order ("a, b and c")."""
    distinct = list(dict.fromkeys(c for c in captions if c))
    if len(distinct) <= 1:
        return "".join(distinct)
    return ", ".join(distinct[:-1]) + " and " + distinct[-1]


def read_json(path: str, flag: str):
    """A whole JSON file; ValueError naming `flag`, the file and the line of a syntax error."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{flag} {path}: malformed JSON at line {e.lineno} column {e.colno} ({e.msg})") from e
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{flag} {path}: unreadable ({e})") from e


def _write_json(path: str, data) -> None:
    with open(f"{path}.tmp", "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    os.replace(f"{path}.tmp", path)


def report_name(options: Options) -> str:
    if options.num_shards == 1:
        return "import_report.json"
    return f"import_report.shard-{options.shard_index:05d}-of-{options.num_shards:05d}.json"


# ------------------------------------------------------------------------------------------ COCO

def _coco_entry_ok(entry, k: int, kind: str, required: dict[str, tuple], path: str, problems: list[dict]) -> bool:
    """True when `entry` (`kind`[k] of a COCO file) is an object with the `required` keys of those types."""
    has_id = isinstance(entry, dict) and isinstance(entry.get("id"), (int, str))
    name = f"{COCO_SINGULAR[kind]} {entry['id']}" if has_id else f"{kind}[{k}]"
    if not isinstance(entry, dict):
        problems.append(problem(path, name, "not an object; dropped"))
        return False
    for key, types in required.items():
        if not isinstance(entry.get(key), types) or isinstance(entry.get(key), bool):
            problems.append(problem(path, name, f"{kind}[{k}] needs {key!r} ({'/'.join(t.__name__ for t in types)}),"
                                                f" got {entry.get(key)!r}; dropped"))
            return False
    return True


COCO_SINGULAR = {"images": "image", "annotations": "annotation", "categories": "category"}
COCO_IMAGE_KEYS = {"id": (int, str), "file_name": (str,)}
COCO_CATEGORY_KEYS = {"id": (int, str), "name": (str,)}
COCO_INSTANCE_KEYS = {"id": (int, str), "image_id": (int, str), "category_id": (int, str), "bbox": (list,)}
COCO_CAPTION_KEYS = {"id": (int, str), "image_id": (int, str), "caption": (str,)}


def load_coco(path: str, flag: str, annotation_keys: dict[str, tuple], problems: list[dict]) -> COCO:
    """A COCO file through pycocotools, its malformed or duplicate entries named in `problems` and left out."""
    data = read_json(path, flag)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations", []), list):
        raise ValueError(f"{flag} {path}: not a COCO file (needs an object with 'images' and 'annotations' lists)")
    cleaned = dict(data)
    sections = [("images", COCO_IMAGE_KEYS), ("annotations", annotation_keys)]
    if "categories" in data:
        sections.append(("categories", COCO_CATEGORY_KEYS))
    for kind, required in sections:
        entries = data.get(kind) if isinstance(data.get(kind), list) else []
        seen, kept = set(), []
        for k, entry in enumerate(entries):
            if not _coco_entry_ok(entry, k, kind, required, path, problems):
                continue
            if entry["id"] in seen:
                problems.append(problem(path, f"{COCO_SINGULAR[kind]} {entry['id']}", f"{kind}[{k}]: duplicate id; "
                                                                                      "dropped"))
                continue
            seen.add(entry["id"])
            kept.append(entry)
        cleaned[kind] = kept
    coco = COCO()
    coco.dataset = cleaned
    with contextlib.redirect_stdout(io.StringIO()):  # its "creating index..." would break the progress bar
        coco.createIndex()
    return coco


def _declared_size(entry: dict) -> tuple[float, float] | None:
    width, height = entry.get("width"), entry.get("height")
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in (width, height)):
        return float(width), float(height)
    return None


def _first_captions(captions: COCO, path: str, problems: list[dict]) -> dict:
    """Image id → its first caption (in file order) in a COCO captions file."""
    first = {}
    for ann in captions.dataset["annotations"]:
        if ann["image_id"] not in captions.imgs:
            problems.append(problem(path, f"annotation {ann['id']}", f"image id {ann['image_id']!r} is not in "
                                                                     "'images'; caption dropped"))
            continue
        first.setdefault(ann["image_id"], ann["caption"].strip())
    return first


def _coco_region(ann: dict, coco: COCO, path: str, sample: str, problems: list[dict]) -> Region | None:
    where = f"annotation {ann['id']}"
    category = coco.cats.get(ann["category_id"])
    if category is None:
        problems.append(problem(path, where, f"unknown category id {ann['category_id']!r}; instance dropped", sample))
        return None
    xywh = four_numbers(ann["bbox"])
    if xywh is None:
        problems.append(problem(path, where, f"bbox must be 4 finite numbers [x, y, w, h], got {ann['bbox']!r}; "
                                             "instance dropped", sample))
        return None
    x, y, w, h = xywh
    return Region([x, y, x + w, y + h], category["name"], where)


def parse_coco(path: str, *, images: str | None = None, captions: str | None = None) -> Parsed:
    problems: list[dict] = []
    coco = load_coco(path, "SRC", COCO_INSTANCE_KEYS, problems)
    first_caption = {}
    if captions is not None:
        first_caption = _first_captions(load_coco(captions, "--captions", COCO_CAPTION_KEYS, problems), captions,
                                        problems)
    folder = images if images is not None else os.path.dirname(os.path.abspath(path))
    counts = Counter(images=len(coco.imgs), annotations=len(coco.anns))
    for ann in coco.dataset["annotations"]:
        if ann["image_id"] not in coco.imgs:
            problems.append(problem(path, f"annotation {ann['id']}", f"image id {ann['image_id']!r} is not in "
                                                                     "'images'; annotation dropped"))
    candidates = []
    for image_id, entry in coco.imgs.items():
        sid = sample_id_for(entry["file_name"])
        regions, dropped = [], 0
        for ann in coco.imgToAnns.get(image_id, []):
            if ann.get("iscrowd"):
                counts["crowd"] += 1
                continue
            region = _coco_region(ann, coco, path, sid, problems)
            dropped += region is None
            if region is not None:
                regions.append(region)
        candidates.append(Candidate(
            id=sid, image_path=os.path.join(folder, entry["file_name"]), file=path, where=f"image {image_id}",
            regions=regions, caption=first_caption.get(image_id), frame=_declared_size(entry), dropped=dropped,
            source={"format": "coco", "image_id": image_id, "file_name": entry["file_name"]}))
    return Parsed(candidates, problems, counts)


# ------------------------------------------------------------------------------------------ LayoutSAM

def _json_records(path: str, problems: list[dict]) -> Iterator[tuple[str, object]]:
    """(where, record) of a JSON list, a single JSON object or JSON lines; malformed lines are named and skipped."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        problems.append(problem(path, "file", f"unreadable ({e}); skipped"))
        return
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            where = f"line {e.lineno} column {e.colno}"
            problems.append(problem(path, where, f"malformed JSON ({e.msg}); file skipped"))
            return
        yield from ((f"record {k}", r) for k, r in enumerate(records))
        return
    try:
        single = json.loads(text)  # one object, or JSON lines of exactly one record
    except json.JSONDecodeError:
        single = None
    if single is not None:
        yield "record 0", single
        return
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield f"line {n}", json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(problem(path, f"line {n}", f"malformed JSON ({e.msg}); record skipped"))


def _listed(value, name: str) -> list:
    """A list field of a LayoutSAM record; the benchmark stores them as strings of JSON or Python literals."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError) as e:
                raise ValueError(f"{name!r} is not a list ({e})") from e
    if not isinstance(value, list):
        raise ValueError(f"{name!r} must be a list, got {type(value).__name__}")
    return value


def _layoutsam_fields(record) -> tuple[dict, str, list[tuple]]:
    """(image info, global caption, [(bbox, description, detail description)]) of either record form."""
    if not isinstance(record, dict):
        raise ValueError(f"a record must be an object, got {type(record).__name__}")
    meta = record.get("metadata", record)
    if not isinstance(meta, dict):
        raise ValueError("'metadata' must be an object")
    if not isinstance(meta.get("global_caption"), str):
        raise ValueError("needs a string 'global_caption'")
    if "bbox_info" in meta:  # the training set
        info = meta.get("image_info") if isinstance(meta.get("image_info"), dict) else {}
        info = {**info, "image_path": record.get("image_path")}
        entries = _listed(meta["bbox_info"], "bbox_info")
        if not all(isinstance(e, dict) for e in entries):
            raise ValueError("every 'bbox_info' entry must be an object")
        return info, meta["global_caption"], [(e.get("bbox"), e.get("description"), e.get("detail_description"))
                                              for e in entries]
    boxes = _listed(meta.get("bbox_list"), "bbox_list")  # the benchmark
    shorts = _listed(meta.get("region_captions", [None] * len(boxes)), "region_captions")
    details = _listed(meta.get("detail_region_captions", [None] * len(boxes)), "detail_region_captions")
    if not len(boxes) == len(shorts) == len(details):
        raise ValueError(f"bbox_list, region_captions and detail_region_captions differ in length "
                         f"({len(boxes)}, {len(shorts)}, {len(details)})")
    return meta, meta["global_caption"], list(zip(boxes, shorts, details, strict=True))


def _text(value) -> str | None:
    return value.strip() if isinstance(value, str) and value.strip() else None


def _layoutsam_region(k: int, bbox, short, detail, region_caption: str) -> Region | str:
    box = four_numbers(bbox)
    if box is None:
        return f"region {k}: bbox must be 4 finite numbers [x0, y0, x1, y1], got {bbox!r}"
    short, detail = _text(short), _text(detail)
    if short is None and detail is None:
        return f"region {k}: has neither a description nor a detail_description"
    if region_caption == "detail":
        caption, other = (detail, {"short_caption": short}) if detail else (short, {})
    else:
        caption, other = (short, {"detail_caption": detail}) if short else (detail, {})
    return Region(box, caption, f"region {k}", {k: v for k, v in other.items() if v and v != caption})


def _layoutsam_image(info: dict, folder: str) -> str | None:
    """The image of a record: `file_name` (or `image_path`) below `folder`, the first that exists."""
    names = [n for n in (info.get("file_name"), info.get("image_path")) if isinstance(n, str) and n]
    for name in names:
        if os.path.isfile(os.path.join(folder, name)):
            return name
    return names[0] if names else None


def _layoutsam_candidate(record, path: str, where: str, folder: str, region_caption: str,
                         problems: list[dict]) -> Candidate | None:
    try:
        info, caption, fields = _layoutsam_fields(record)
    except ValueError as e:
        problems.append(problem(path, where, f"malformed record: {e}; skipped"))
        return None
    name = _layoutsam_image(info, folder)
    if name is None:
        problems.append(problem(path, where, "malformed record: no 'file_name' or 'image_path'; skipped"))
        return None
    sid = sample_id_for(name)
    regions = []
    for k, (bbox, short, detail) in enumerate(fields):
        region = _layoutsam_region(k, bbox, short, detail, region_caption)
        if isinstance(region, str):
            problems.append(problem(path, where, f"{region}; instance dropped", sid))
            continue
        region.where = f"{where} {region.where}"
        regions.append(region)
    source = {"format": "layoutsam", "file_name": name, "image_id": info.get("image_id")}
    return Candidate(id=sid, image_path=os.path.join(folder, name), file=path, where=where, regions=regions,
                     caption=caption.strip(), frame=_declared_size(info), dropped=len(fields) - len(regions),
                     source={k: v for k, v in source.items() if v is not None})


def layoutsam_files(src: str) -> list[str]:
    if os.path.isfile(src):
        return [src]
    if not os.path.isdir(src):
        raise ValueError(f"SRC {src!r} does not exist")
    files = sorted(os.path.join(src, n) for n in os.listdir(src) if n.endswith((".json", ".jsonl")))
    if not files:
        raise ValueError(f"SRC {src!r} holds no .json or .jsonl file")
    return files


def parse_layoutsam(src: str, *, images: str | None = None, region_caption: str = "detail") -> Parsed:
    if region_caption not in ("detail", "short"):
        raise ValueError(f"--region_caption must be 'detail' or 'short', got {region_caption!r}")
    problems: list[dict] = []
    candidates = []
    counts = Counter()
    for path in layoutsam_files(src):
        folder = images if images is not None else os.path.dirname(os.path.abspath(path))
        for where, record in _json_records(path, problems):
            counts["records"] += 1
            candidate = _layoutsam_candidate(record, path, where, folder, region_caption, problems)
            if candidate is not None:
                candidates.append(candidate)
    counts["annotations"] = sum(len(c.regions) + c.dropped for c in candidates)
    return Parsed(candidates, problems, counts)


# ------------------------------------------------------------------------------------------ YOLO

def _names_from(path: str) -> list[str]:
    if path.endswith((".yaml", ".yml")):
        try:
            with open(path, encoding="utf-8") as f:
                data = yaml.safe_load(f)
        except (OSError, yaml.YAMLError) as e:
            raise ValueError(f"--names {path}: unreadable YAML ({e})") from e
        names = data.get("names") if isinstance(data, dict) else None
        if isinstance(names, dict) and all(isinstance(k, int) for k in names):
            if sorted(names) != list(range(len(names))):
                raise ValueError(f"--names {path}: 'names' ids must be 0..{len(names) - 1}, got {sorted(names)}")
            names = [names[k] for k in range(len(names))]
        if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
            raise ValueError(f"--names {path}: needs 'names', a list of strings or {{id: name}}")
        return names
    try:
        with open(path, encoding="utf-8") as f:
            names = [line.strip() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--names {path}: unreadable ({e})") from e
    if not names:
        raise ValueError(f"--names {path}: holds no class name")
    return names


def yolo_names(src: str, names: str | None) -> list[str]:
    if names is not None:
        return _names_from(names)
    for name in YOLO_NAME_FILES:
        if os.path.isfile(os.path.join(src, name)):
            return _names_from(os.path.join(src, name))
    raise ValueError(f"--names: SRC {src} has none of {', '.join(YOLO_NAME_FILES)}; name the class names file")


def _walk(folder: str, exts: tuple[str, ...]) -> list[str]:
    """Sorted paths below `folder` (relative to it, "/"-separated) whose extension is in `exts`."""
    found = []
    for parent, dirs, files in os.walk(folder):
        dirs.sort()
        rel = os.path.relpath(parent, folder)
        found += [os.path.normpath(os.path.join(rel, n)).replace(os.sep, "/") for n in files
                  if os.path.splitext(n)[1].lower() in exts]
    return sorted(found)


def _yolo_box(fields: list[str], names: list[str]) -> tuple[list[float], str] | str:
    """(normalized xyxy box, caption) of one label line's fields, or what is wrong with them."""
    if len(fields) != 5 and (len(fields) < 7 or len(fields) % 2 == 0):
        return f"expected 'class cx cy w h' (or a polygon 'class x1 y1 x2 y2 x3 y3 ...'), got {len(fields)} fields"
    try:
        cls, values = float(fields[0]), [float(v) for v in fields[1:]]
    except ValueError:
        return f"not numbers: {' '.join(fields)!r}"
    if not cls.is_integer() or not 0 <= cls < len(names):
        return f"class {fields[0]} is not one of the {len(names)} class names (0..{len(names) - 1})"
    if not all(math.isfinite(v) for v in values):
        return f"coordinates {values} are not finite"
    if len(values) == 4:
        cx, cy, w, h = values
        return [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], names[int(cls)]
    xs, ys = values[0::2], values[1::2]
    return [min(xs), min(ys), max(xs), max(ys)], names[int(cls)]


def _yolo_regions(label_path: str, names: list[str], sid: str, problems: list[dict]) -> tuple[list[Region], int]:
    try:
        with open(label_path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        problems.append(problem(label_path, "file", f"unreadable label file ({e}); its instances dropped", sid))
        return [], 1
    regions, dropped = [], 0
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        parsed = _yolo_box(line.split(), names)
        if isinstance(parsed, str):
            problems.append(problem(label_path, f"line {n}", f"{parsed}; instance dropped", sid))
            dropped += 1
            continue
        regions.append(Region(parsed[0], parsed[1], f"line {n}"))
    return regions, dropped


def parse_yolo(src: str, *, names: str | None = None) -> Parsed:
    images_dir, labels_dir = os.path.join(src, "images"), os.path.join(src, "labels")
    if not os.path.isdir(images_dir):
        raise ValueError(f"SRC {src!r} has no images/ folder (YOLO layout: images/ and labels/ side by side)")
    class_names = yolo_names(src, names)
    problems: list[dict] = []
    images = _walk(images_dir, SOURCE_IMAGE_EXTS)
    stems = {os.path.splitext(rel)[0] for rel in images}
    labels = _walk(labels_dir, (".txt",)) if os.path.isdir(labels_dir) else []
    for rel in labels:
        if os.path.splitext(rel)[0] not in stems:
            problems.append(problem(os.path.join(labels_dir, rel), "file", "label file without an image; skipped"))
    candidates = []
    for rel in images:
        sid = sample_id_for(rel)
        label_path = os.path.join(labels_dir, os.path.splitext(rel)[0] + ".txt")
        regions, dropped = [], 0
        if os.path.isfile(label_path):
            regions, dropped = _yolo_regions(label_path, class_names, sid, problems)
        candidates.append(Candidate(
            id=sid, image_path=os.path.join(images_dir, rel), file=label_path, where=f"image images/{rel}",
            regions=regions, normalized=True, dropped=dropped, source={"format": "yolo", "image": f"images/{rel}"}))
    counts = Counter(images=len(images), label_files=len(labels),
                     annotations=sum(len(c.regions) + c.dropped for c in candidates))
    return Parsed(candidates, problems, counts)


# ------------------------------------------------------------------------------------------ writing

def _scale(c: Candidate, width: int, height: int) -> tuple[float, float] | str:
    """The factors from the candidate's box units to its image's pixels, or why the two disagree."""
    if c.normalized:
        return float(width), float(height)
    if c.frame is None or c.frame == (width, height):
        return 1.0, 1.0
    fw, fh = c.frame
    if abs((fw / fh) / (width / height) - 1) > ASPECT_TOLERANCE:
        return f"declared size {fw:g}×{fh:g} disagrees with the image's {width}×{height}"
    return width / fw, height / fh


def _fit_box(bbox: list[float], scale: tuple[float, float], width: int, height: int,
             tolerance: float) -> tuple[list[float], bool] | str:
    """(pixel box inside the image, whether it was clamped), or why the box is wrong."""
    sx, sy = scale
    shown = [float(f"{v:.6g}") for v in bbox]
    x0, y0, x1, y1 = bbox[0] * sx, bbox[1] * sy, bbox[2] * sx, bbox[3] * sy
    if x1 <= x0 or y1 <= y0:
        return f"box {shown} has no area"
    overshoot = max(-x0, -y0, x1 - width, y1 - height)
    if overshoot > tolerance:
        return (f"box {shown} lies outside the {width}×{height} image by {overshoot:.4g} px "
                f"(more than --box_tolerance {tolerance:g})")
    inside = [min(max(v, 0.0), side) for v, side in zip((x0, y0, x1, y1), (width, height) * 2, strict=True)]
    if inside[2] <= inside[0] or inside[3] <= inside[1]:
        return f"box {shown} has no area inside the {width}×{height} image"
    return [round(v, DECIMALS) for v in inside], overshoot > 0


def _instances(c: Candidate, scale: tuple[float, float], size: tuple[int, int], options: Options,
               counts: Counter, problems: list[dict]) -> list[dict]:
    instances = []
    for region in c.regions:
        fitted = _fit_box(region.bbox, scale, *size, options.box_tolerance)
        if isinstance(fitted, str):
            problems.append(problem(c.file, region.where, f"{fitted}; instance dropped", c.id))
            counts["instances_dropped"] += 1
            continue
        box, clamped = fitted
        if min(box[2] - box[0], box[3] - box[1]) < options.min_box:
            counts["small"] += 1
            continue
        counts["clamped"] += clamped
        instances.append({"bbox": box, "caption": region.caption, **region.extra})
    return instances


def import_sample(c: Candidate, raw: str, options: Options, counts: Counter) -> list[dict]:
    """Writes one candidate into `raw`; returns the problems found (the sample is skipped on a fatal one)."""
    problems: list[dict] = []
    if not os.path.isfile(c.image_path):
        return [problem(c.file, c.where, f"image {c.image_path} does not exist; sample skipped", c.id)]
    try:
        image = read_image(c.image_path, c.id)
    except SampleError as e:
        return [problem(c.file, c.where, f"{e}; sample skipped", c.id)]
    scale = _scale(c, *image.size)
    if isinstance(scale, str):
        return [problem(c.file, c.where, f"{c.image_path}: {scale}; sample skipped", c.id)]
    counts["rescaled"] += scale != (1.0, 1.0) and not c.normalized
    instances = _instances(c, scale, image.size, options, counts, problems)
    if not instances and not options.keep_empty:
        if c.dropped or problems:  # skipped, not empty: its instances were bad
            return [*problems, problem(c.file, c.where, "every instance was dropped; sample skipped", c.id)]
        counts["empty"] += 1
        return problems
    caption = c.caption or join_captions([inst["caption"] for inst in instances])
    try:
        write_raw_sample(raw, c.id, image, caption, instances, ext=options.ext, extra={"source": c.source})
    except ValueError as e:  # SampleError too: an id that is no plain file name
        return [*problems, problem(c.file, c.where, f"{e}; sample skipped", c.id)]
    counts["written"] += 1
    counts["instances"] += len(instances)
    return problems


def _unique(candidates: list[Candidate]) -> tuple[list[Candidate], list[dict]]:
    """The candidates sorted by id, the first of each id kept; later ones named."""
    first: dict[str, Candidate] = {}
    problems = []
    for c in candidates:
        if c.id in first:
            problems.append(problem(c.file, c.where, f"sample id {c.id!r} is taken by {first[c.id].image_path}; "
                                                     f"{c.image_path} skipped", c.id))
            continue
        first[c.id] = c
    return [first[k] for k in sorted(first)], problems


def _earlier_problems(raw: str, options: Options, done: set[str]) -> list[dict]:
    """Problems an earlier run of this shard found in samples that are now done (this run does not revisit them)."""
    path = os.path.join(raw, report_name(options))
    if not done or not os.path.isfile(path):
        return []
    try:
        with open(path, encoding="utf-8") as f:
            earlier = json.load(f).get("problems", [])
    except (OSError, ValueError, AttributeError):
        log.warning("%s: unreadable earlier report; its problems are not carried over", path)
        return []
    return [p for p in earlier if isinstance(p, dict) and p.get("sample") in done]


def _merged(*lists: list[dict]) -> list[dict]:
    seen, merged = set(), []
    for p in (p for ps in lists for p in ps):
        key = json.dumps(p, sort_keys=True)
        if key not in seen:
            seen.add(key)
            merged.append(p)
    return merged


def run_import(fmt: str, src: str, raw: str, parse: Callable[[], Parsed], options: Options) -> dict:
    """Parses the source, writes this shard's samples into `raw`, writes and returns the report."""
    options.check()
    bar = tqdm(total=None, unit="sample", disable=not options.progress, desc=f"import {fmt}: reading {src}")
    log.info("import %s: reading %s", fmt, src)
    parsed = parse()
    candidates, duplicates = _unique(parsed.candidates)
    every_id = {c.id for c in candidates}
    mine = candidates[options.shard_index::options.num_shards]
    my_ids = {c.id for c in mine}
    problems = [p for p in [*parsed.problems, *duplicates]
                if p["sample"] in my_ids or (p["sample"] not in every_id and options.shard_index == 0)]
    log.info("import %s: %d samples in %s (%s); shard %d/%d has %d", fmt, len(candidates), src,
             ", ".join(f"{v} {k}" for k, v in sorted(parsed.counts.items())), options.shard_index,
             options.num_shards, len(mine))
    os.makedirs(raw, exist_ok=True)
    counts = Counter()
    done = set()
    bar.reset(total=len(mine))
    bar.set_description(f"import {fmt} shard {options.shard_index}/{options.num_shards}")
    for c in mine:
        if raw_sample_done(raw, c.id):
            done.add(c.id)
        else:
            problems += import_sample(c, raw, options, counts)
        bar.update()
        bar.set_postfix(written=counts["written"], done_before=len(done), problems=len(problems))
    bar.close()
    problems = _merged(problems, _earlier_problems(raw, options, done))
    skipped = len(mine) - len(done) - counts["written"] - counts["empty"]
    report = {
        "format": fmt, "source": os.path.abspath(src), "raw": os.path.abspath(raw),
        "shard_index": options.shard_index, "num_shards": options.num_shards,
        "source_counts": dict(sorted(parsed.counts.items())),
        "counts": {"samples": len(mine), "written": counts["written"], "already_done": len(done), "skipped": skipped,
                   **{k: counts[k] for k in ("empty", "instances", "instances_dropped", "small", "clamped",
                                             "rescaled")}},
        "problems": problems,
    }
    _write_json(os.path.join(raw, report_name(options)), report)
    if problems:
        log.warning("%d problems (each skipped):\n%s", len(problems), "\n".join(describe(p) for p in problems))
    log.info("import %s shard %d/%d: %s; report %s", fmt, options.shard_index, options.num_shards,
             ", ".join(f"{v} {k}" for k, v in report["counts"].items()), os.path.join(raw, report_name(options)))
    return report


def import_coco(src: str, raw: str, *, images: str | None = None, captions: str | None = None,
                options: Options | None = None) -> dict:
    if not os.path.isfile(src):
        raise ValueError(f"SRC {src!r} is not a file (a COCO instances JSON)")
    return run_import("coco", src, raw, lambda: parse_coco(src, images=images, captions=captions), options or Options())


def import_layoutsam(src: str, raw: str, *, images: str | None = None, region_caption: str = "detail",
                     options: Options | None = None) -> dict:
    return run_import("layoutsam", src, raw, lambda: parse_layoutsam(src, images=images, region_caption=region_caption),
                      options or Options())


def import_yolo(src: str, raw: str, *, names: str | None = None, options: Options | None = None) -> dict:
    return run_import("yolo", src, raw, lambda: parse_yolo(src, names=names), options or Options())


# ------------------------------------------------------------------------------------------ the reverse

@dataclass
class RawRecord:
    id: str
    image_path: str
    size: tuple[int, int]  # (width, height)
    caption: str
    instances: list[dict]


def read_raw(raw: str) -> list[RawRecord]:
    """Every sample of a raw folder as written (boxes in pixels, no bucket fitting), sorted by id."""
    records = []
    for sid, image_path in list_sample_ids(raw):
        path = os.path.join(raw, "captions", f"{sid}.json")
        data = read_json(path, "RAW")
        with Image.open(image_path) as im:
            size = im.size
        records.append(RawRecord(sid, image_path, size, data.get("caption", ""), data.get("instances", [])))
    return records


def raw_to_coco(raw: str) -> tuple[dict, dict]:
    """A raw folder as COCO (instances, captions): one image per sample (file_name relative to RAW/images),
    one category per distinct instance caption (sorted, ids from 1), bbox xywh, the scene caption as the
    image's one caption."""
    records = read_raw(raw)
    names = sorted({inst["caption"] for r in records for inst in r.instances})
    category_ids = {name: k for k, name in enumerate(names, start=1)}
    images, annotations, captions = [], [], []
    for image_id, r in enumerate(records, start=1):
        images.append({"id": image_id, "file_name": os.path.basename(r.image_path), "width": r.size[0],
                       "height": r.size[1]})
        captions.append({"id": image_id, "image_id": image_id, "caption": r.caption})
        for inst in r.instances:
            x0, y0, x1, y1 = inst["bbox"]
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": category_ids[inst["caption"]], "bbox": [x0, y0, x1 - x0, y1 - y0],
                                "area": (x1 - x0) * (y1 - y0), "iscrowd": 0})
    info = {"description": f"exported by mpp from {os.path.abspath(raw)}"}
    categories = [{"id": k, "name": name, "supercategory": ""} for name, k in category_ids.items()]
    return ({"info": info, "licenses": [], "images": images, "annotations": annotations, "categories": categories},
            {"info": info, "licenses": [], "images": images, "annotations": captions})


def raw_to_layoutsam(raw: str) -> list[dict]:
    """A raw folder as LayoutSAM training records (file_name in RAW/images: import them with --images RAW/images)."""
    records = []
    for r in read_raw(raw):
        name = os.path.basename(r.image_path)
        regions = [{"bbox": inst["bbox"], "description": inst.get("short_caption", inst["caption"]),
                    "detail_description": inst.get("detail_caption", inst["caption"])} for inst in r.instances]
        records.append({"image_path": name, "metadata": {
            "image_info": {"file_name": name, "width": r.size[0], "height": r.size[1]},
            "global_caption": r.caption, "bbox_info": regions}})
    return records


def raw_to_yolo(raw: str, out: str) -> list[str]:
    """A raw folder as a YOLO dataset in `out` (images/, labels/, data.yaml); returns the class names
    (the distinct instance captions, sorted)."""
    records = read_raw(raw)
    names = sorted({inst["caption"] for r in records for inst in r.instances})
    class_ids = {name: k for k, name in enumerate(names)}
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    os.makedirs(os.path.join(out, "labels"), exist_ok=True)
    for r in records:
        shutil.copyfile(r.image_path, os.path.join(out, "images", os.path.basename(r.image_path)))
        width, height = r.size
        lines = []
        for inst in r.instances:
            x0, y0, x1, y1 = inst["bbox"]
            lines.append(f"{class_ids[inst['caption']]} {(x0 + x1) / 2 / width:.6f} {(y0 + y1) / 2 / height:.6f} "
                         f"{(x1 - x0) / width:.6f} {(y1 - y0) / height:.6f}")
        with open(os.path.join(out, "labels", f"{r.id}.txt"), "w", encoding="utf-8") as f:
            f.write("".join(f"{line}\n" for line in lines))
    with open(os.path.join(out, "data.yaml"), "w", encoding="utf-8") as f:
        yaml.safe_dump({"names": names}, f)
    return names


# ------------------------------------------------------------------------------------------ command line

def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--min_box", type=float, default=0.0, help="leave out boxes thinner than this many px")
    common.add_argument("--box_tolerance", type=float, default=1.0,
                        help="px a box may overshoot its image (clamped); beyond it the instance is dropped")
    common.add_argument("--keep_empty", action="store_true", help="also write samples without instances")
    common.add_argument("--ext", default=".png", help="image format of RAW/images (default .png, lossless)")
    common.add_argument("--num_shards", type=int, default=1)
    common.add_argument("--shard_index", type=int, default=0)
    common.add_argument("--quiet", action="store_true", help="no progress bar")
    p = argparse.ArgumentParser(prog="mpp import", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="format", required=True)
    coco = sub.add_parser("coco", parents=[common], help="a COCO instances JSON")
    coco.add_argument("--images", help="image folder (default: the JSON's folder)")
    coco.add_argument("--captions", help="a COCO captions JSON: the first caption of an image is its scene caption")
    layoutsam = sub.add_parser("layoutsam", parents=[common], help="LayoutSAM records (JSONL/JSON, file or folder)")
    layoutsam.add_argument("--images", help="image folder (default: the records' folder)")
    layoutsam.add_argument("--region_caption", choices=("detail", "short"), default="detail",
                           help="instance caption: the dense detail_description (default) or the short description")
    yolo = sub.add_parser("yolo", parents=[common], help="a YOLO dataset folder (images/, labels/)")
    yolo.add_argument("--names", help="class names: a data.yaml or a classes.txt (default: found in SRC)")
    for parser in (coco, layoutsam, yolo):
        parser.add_argument("src", metavar="SRC")
        parser.add_argument("raw", metavar="RAW")
    return p


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    options = Options(min_box=a.min_box, box_tolerance=a.box_tolerance, keep_empty=a.keep_empty, ext=a.ext,
                      num_shards=a.num_shards, shard_index=a.shard_index, progress=not a.quiet)
    try:
        if a.format == "coco":
            report = import_coco(a.src, a.raw, images=a.images, captions=a.captions, options=options)
        elif a.format == "layoutsam":
            report = import_layoutsam(a.src, a.raw, images=a.images, region_caption=a.region_caption, options=options)
        else:
            report = import_yolo(a.src, a.raw, names=a.names, options=options)
    except ValueError as e:
        p.error(str(e))
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
