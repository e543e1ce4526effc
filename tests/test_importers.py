"""`mpp import coco|layoutsam|yolo`: toy scenes written in each format, imported into the raw layout,
prepared and trained on; bad inputs named and skipped; round trips; resume and shards."""

import filecmp
import json
import os
from pathlib import Path

import pytest
import yaml
from PIL import Image
from pycocotools.coco import COCO

from mpp import cli
from mpp.__main__ import main as mpp_main
from mpp.importers import Options, import_coco, main, raw_to_coco, raw_to_layoutsam, raw_to_yolo
from mpp.prepare import prepare_dataset
from mpp.toy.scenes import ToyWorld
from tests.helpers import TOY_SIZE, fit_args, recorder

WORLD = ToyWorld(image_size=TOY_SIZE, seed=0)


def scenes(n: int) -> list:
    return [WORLD.scene(i) for i in range(n)]


def xywh(bbox) -> list[float]:
    x0, y0, x1, y1 = bbox
    return [x0, y0, x1 - x0, y1 - y0]


def write_coco(folder: Path, n: int) -> dict:
    """n toy scenes as a COCO dataset in `folder`: images/, instances.json, captions.json (image ids 100+i,
    annotation ids 1000·(i+1)+k). Returns the paths and the instances dict (to spoil and rewrite)."""
    (folder / "images").mkdir(parents=True)
    shown = scenes(n)
    names = sorted({inst.caption for s in shown for inst in s.instances})
    category = {name: k for k, name in enumerate(names, start=1)}
    images, annotations, captions = [], [], []
    for i, s in enumerate(shown):
        Image.fromarray(s.image).save(folder / "images" / f"scene_{i:03d}.png")
        images.append({"id": 100 + i, "file_name": f"scene_{i:03d}.png", "width": TOY_SIZE, "height": TOY_SIZE})
        captions.append({"id": 100 + i, "image_id": 100 + i, "caption": s.caption + " "})
        for k, inst in enumerate(s.instances):
            box = xywh(inst.bbox)
            annotations.append({"id": 1000 * (i + 1) + k, "image_id": 100 + i, "category_id": category[inst.caption],
                                "bbox": box, "area": box[2] * box[3], "iscrowd": 0})
    instances = {"images": images, "annotations": annotations,
                 "categories": [{"id": k, "name": name, "supercategory": "toy"} for name, k in category.items()]}
    paths = {"instances": folder / "instances.json", "captions": folder / "captions.json", "images": folder / "images"}
    paths["instances"].write_text(json.dumps(instances))
    paths["captions"].write_text(json.dumps({"images": images, "annotations": captions}))
    assert len(COCO(str(paths["instances"])).getAnnIds()) == len(annotations)  # pycocotools reads it
    return {**paths, "data": instances}


def coco_args(coco: dict, raw: Path, *extra: str) -> list[str]:
    return ["coco", str(coco["instances"]), str(raw), "--images", str(coco["images"]), "--quiet", *extra]


def caption_file(raw: Path, sid: str) -> dict:
    return json.loads((raw / "captions" / f"{sid}.json").read_text())


def report(raw: Path, name: str = "import_report.json") -> dict:
    return json.loads((raw / name).read_text())


def problem_at(rep: dict, where: str) -> dict:
    (found,) = [p for p in rep["problems"] if p["where"] == where]
    return found


# ------------------------------------------------------------------------------------------ COCO

def test_coco_import_prepares_and_trains(in_tmp, toy_models, toy_settings):
    coco = write_coco(in_tmp / "coco", 12)
    raw, prepared = in_tmp / "raw", in_tmp / "prepared"
    assert main([*coco_args(coco, raw), "--captions", str(coco["captions"])]) == 0
    for i, s in enumerate(scenes(12)):
        record = caption_file(raw, f"scene_{i:03d}")
        assert record["caption"] == s.caption  # the first COCO caption, stripped
        assert [(inst["bbox"], inst["caption"]) for inst in record["instances"]] == \
            [(list(map(float, inst.bbox)), inst.caption) for inst in s.instances]
        assert record["source"] == {"format": "coco", "image_id": 100 + i, "file_name": f"scene_{i:03d}.png"}
    assert report(raw)["counts"]["written"] == 12 and report(raw)["problems"] == []

    result = prepare_dataset(str(raw), str(prepared), encoders=toy_settings, resolution=TOY_SIZE, progress=False)
    assert len(result.written) == 12 and not result.errors
    run = cli.main(fit_args(1, toy_models, str(prepared)))
    seen = recorder(run)
    assert len(seen.losses) >= 4 and all(loss == loss for loss in seen.losses)
    assert set(seen.ids) <= {f"scene_{i:03d}" for i in range(12)}


def test_coco_bad_inputs_are_named_and_skipped(tmp_path, caplog):
    coco = write_coco(tmp_path / "coco", 5)
    data = coco["data"]
    first = data["annotations"][0]  # scene 0's only instance: the sample is left empty
    first["bbox"] = [100.0, 40.0, 40.0, 20.0]  # x1 = 140 > 128
    scene1 = [a for a in data["annotations"] if a["image_id"] == 101]
    scene1[0]["bbox"] = [scene1[0]["bbox"][0], scene1[0]["bbox"][1], 128.5 - scene1[0]["bbox"][0], 10.0]  # clamped
    scene1[1]["category_id"] = 77
    data["annotations"] += [
        {"id": 9001, "image_id": 999, "category_id": 1, "bbox": [1, 1, 5, 5], "area": 25, "iscrowd": 0},
        {"id": 9002, "image_id": 102, "category_id": 1, "bbox": [1, 1, 5, 5], "area": 25, "iscrowd": 1},
        {"id": 9003, "image_id": 102, "category_id": 1, "bbox": [1, 2, "wide", 4], "area": 25, "iscrowd": 0},
        {"id": 9004, "image_id": 102, "category_id": 1},
    ]
    coco["instances"].write_text(json.dumps(data))
    os.remove(coco["images"] / "scene_004.png")
    raw = tmp_path / "raw"
    with caplog.at_level("WARNING", logger="mpp.importers"):
        assert mpp_main(["import", *coco_args(coco, raw)]) == 1

    rep = report(raw)
    src = str(coco["instances"])
    assert "lies outside the 128×128 image" in problem_at(rep, "annotation 1000")["problem"]
    assert "unknown category id 77" in problem_at(rep, f"annotation {scene1[1]['id']}")["problem"]
    assert "image id 999 is not in 'images'" in problem_at(rep, "annotation 9001")["problem"]
    assert "bbox must be 4 finite numbers" in problem_at(rep, "annotation 9003")["problem"]
    assert f"annotations[{len(data['annotations']) - 1}] needs 'bbox'" in problem_at(rep, "annotation 9004")["problem"]
    assert "scene_004.png does not exist" in problem_at(rep, "image 104")["problem"]
    assert "every instance was dropped" in problem_at(rep, "image 100")["problem"]
    assert all(p["file"] == src for p in rep["problems"])
    assert f"{src}: annotation 9001: image id 999" in caplog.text and f"{src}: annotation 1000: box" in caplog.text

    written = sorted(p.stem for p in (raw / "captions").iterdir())
    assert written == ["scene_001", "scene_002", "scene_003"]  # 0: no instance left, 4: no image
    kept1 = caption_file(raw, "scene_001")["instances"]
    assert len(kept1) == len(scene1) - 1 and kept1[0]["bbox"][2] == 128.0  # the overshoot of 0.5 px is clamped
    assert len(caption_file(raw, "scene_002")["instances"]) == len(scenes(3)[2].instances)  # crowd left out
    counts = rep["counts"]
    assert (counts["written"], counts["skipped"], counts["empty"], counts["clamped"]) == (3, 2, 0, 1)
    assert rep["source_counts"]["crowd"] == 1


def test_coco_declared_size_rescales_or_skips(tmp_path):
    coco = write_coco(tmp_path / "coco", 2)
    coco["data"]["images"][0].update(width=2 * TOY_SIZE, height=2 * TOY_SIZE)  # annotations of a 256² original
    for ann in coco["data"]["annotations"]:
        if ann["image_id"] == 100:
            ann["bbox"] = [2 * v for v in ann["bbox"]]
    coco["data"]["images"][1].update(width=2 * TOY_SIZE)  # another aspect ratio: the boxes cannot be trusted
    coco["instances"].write_text(json.dumps(coco["data"]))
    raw = tmp_path / "raw"
    assert main(coco_args(coco, raw)) == 1
    assert caption_file(raw, "scene_000")["instances"][0]["bbox"] == list(map(float, scenes(1)[0].instances[0].bbox))
    assert "declared size 256×128 disagrees with the image's 128×128" in problem_at(report(raw), "image 101")["problem"]
    assert report(raw)["counts"]["rescaled"] == 1


def test_coco_without_captions_joins_instance_captions_and_filters(tmp_path):
    coco = write_coco(tmp_path / "coco", 3)
    raw = tmp_path / "raw"
    assert main(coco_args(coco, raw, "--min_box", "40")) == 0
    for i, s in enumerate(scenes(3)):
        big = [inst.caption for inst in s.instances
               if min(inst.bbox[2] - inst.bbox[0], inst.bbox[3] - inst.bbox[1]) >= 40]
        if not big:
            assert not (raw / "captions" / f"scene_{i:03d}.json").exists()
            continue
        record = caption_file(raw, f"scene_{i:03d}")
        assert [inst["caption"] for inst in record["instances"]] == big
        distinct = list(dict.fromkeys(big))
        assert record["caption"] == (distinct[0] if len(distinct) == 1 else
                                     ", ".join(distinct[:-1]) + " and " + distinct[-1])
    assert report(raw)["counts"]["small"] > 0


def test_malformed_coco_json_is_named_with_its_line(tmp_path):
    path = tmp_path / "instances.json"
    path.write_text('{"images": [],\n "annotations": [,]}')
    with pytest.raises(ValueError, match=r"SRC .*instances.json: malformed JSON at line 2 column"):
        import_coco(str(path), str(tmp_path / "raw"))
    with pytest.raises(SystemExit):
        main(["coco", str(path), str(tmp_path / "raw"), "--quiet"])
    path.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(ValueError, match=r"--shard_index must lie in \[0, --num_shards=2\)"):
        import_coco(str(path), str(tmp_path / "raw"), options=Options(num_shards=2, shard_index=2, progress=False))


def test_coco_round_trip_keeps_every_box_and_caption(tmp_path):
    coco = write_coco(tmp_path / "coco", 6)
    raw = tmp_path / "raw"
    assert main([*coco_args(coco, raw), "--captions", str(coco["captions"])]) == 0
    instances, captions = raw_to_coco(str(raw))
    (tmp_path / "back.json").write_text(json.dumps(instances))
    (tmp_path / "back_captions.json").write_text(json.dumps(captions))
    original, back = COCO(str(coco["instances"])), COCO(str(tmp_path / "back.json"))

    def boxes(c: COCO) -> dict:
        by_name = {}
        for img in c.imgs.values():
            anns = c.imgToAnns[img["id"]]
            by_name[os.path.splitext(img["file_name"])[0]] = sorted(
                (c.cats[a["category_id"]]["name"], *[round(v, 6) for v in a["bbox"]]) for a in anns)
        return by_name

    assert boxes(back) == boxes(original)
    back_captions = COCO(str(tmp_path / "back_captions.json"))
    assert {back.imgs[a["image_id"]]["file_name"]: a["caption"] for a in back_captions.dataset["annotations"]} == \
        {f"scene_{i:03d}.png": s.caption for i, s in enumerate(scenes(6))}

    again = tmp_path / "again"  # and raw → COCO → raw gives the same samples
    assert main(["coco", str(tmp_path / "back.json"), str(again), "--images", str(raw / "images"), "--quiet",
                 "--captions", str(tmp_path / "back_captions.json")]) == 0
    for i in range(6):
        first, second = caption_file(raw, f"scene_{i:03d}"), caption_file(again, f"scene_{i:03d}")
        assert (first["caption"], first["instances"]) == (second["caption"], second["instances"])


def test_resume_writes_nothing_new_and_keeps_earlier_problems(tmp_path):
    coco = write_coco(tmp_path / "coco", 4)
    coco["data"]["annotations"][1]["bbox"] = [-20.0, 0.0, 30.0, 30.0]  # scene 1 keeps its other instances
    coco["instances"].write_text(json.dumps(coco["data"]))
    raw = tmp_path / "raw"
    assert main(coco_args(coco, raw)) == 1
    stamps = {p: p.stat().st_mtime_ns for p in raw.rglob("*") if p.is_file() and p.name != "import_report.json"}
    first = report(raw)
    assert main(coco_args(coco, raw)) == 1  # the instance dropped the first time is still reported
    second = report(raw)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert second["counts"]["written"] == 0 and second["counts"]["already_done"] == first["counts"]["written"] == 4
    assert second["problems"] == first["problems"] and len(first["problems"]) == 1


def test_two_shards_write_what_one_run_writes(tmp_path):
    coco = write_coco(tmp_path / "coco", 7)
    coco["data"]["annotations"][2]["bbox"] = [0.0, 0.0, 500.0, 10.0]
    coco["data"]["annotations"].append({"id": 9001, "image_id": 999, "category_id": 1, "bbox": [1, 1, 5, 5]})
    coco["instances"].write_text(json.dumps(coco["data"]))
    whole, sharded = tmp_path / "whole", tmp_path / "sharded"
    main(coco_args(coco, whole))
    for index in (0, 1):
        main(coco_args(coco, sharded, "--num_shards", "2", "--shard_index", str(index)))
    for sub in ("images", "captions"):
        names = sorted(os.listdir(whole / sub))
        assert names == sorted(os.listdir(sharded / sub)) and len(names) == 7
        assert all(filecmp.cmp(whole / sub / n, sharded / sub / n, shallow=False) for n in names)
    shard_reports = [report(sharded, f"import_report.shard-0000{i}-of-00002.json") for i in (0, 1)]
    assert sorted(shard_reports[0]["problems"] + shard_reports[1]["problems"], key=json.dumps) == \
        sorted(report(whole)["problems"], key=json.dumps)
    assert [r["counts"]["samples"] for r in shard_reports] == [4, 3]


# ------------------------------------------------------------------------------------------ YOLO

def write_yolo(folder: Path, n: int) -> list[str]:
    """n toy scenes as a YOLO dataset (images/train, labels/train, data.yaml); returns the class names."""
    shown = scenes(n)
    names = sorted({inst.caption for s in shown for inst in s.instances})
    for sub in ("images/train", "labels/train"):
        (folder / sub).mkdir(parents=True)
    for i, s in enumerate(shown):
        Image.fromarray(s.image).save(folder / "images/train" / f"scene_{i:03d}.png")
        lines = []
        for inst in s.instances:
            x0, y0, x1, y1 = (v / TOY_SIZE for v in inst.bbox)
            cls = names.index(inst.caption)
            lines.append(f"{cls} {(x0 + x1) / 2:.6f} {(y0 + y1) / 2:.6f} {x1 - x0:.6f} {y1 - y0:.6f}")
        (folder / "labels/train" / f"scene_{i:03d}.txt").write_text("\n".join(lines) + "\n")
    (folder / "data.yaml").write_text(yaml.safe_dump({"path": ".", "train": "images/train",
                                                      "names": dict(enumerate(names))}))
    return names


def test_yolo_import_and_bad_label_lines(tmp_path, caplog):
    src, raw = tmp_path / "yolo", tmp_path / "raw"
    write_yolo(src, 4)
    label = src / "labels/train/scene_001.txt"
    good = label.read_text().splitlines()
    bad = ["99 0.5 0.5 0.1 0.1", "0 0.95 0.5 0.3 0.3", "0 0.5 abc 0.1 0.1", "0 0.5"]
    label.write_text("\n".join([*good, *bad]) + "\n")
    (src / "labels/train/orphan.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    os.remove(src / "labels/train/scene_003.txt")  # a background image: no instance, not a problem
    with caplog.at_level("WARNING", logger="mpp.importers"):
        assert main(["yolo", str(src), str(raw), "--quiet", "--keep_empty"]) == 1

    rep = report(raw)
    n = len(good)
    assert "class 99 is not one of the" in problem_at(rep, f"line {n + 1}")["problem"]
    outside = "box [0.8, 0.35, 1.1, 0.65] lies outside the 128×128 image by 12.8 px"
    assert outside in problem_at(rep, f"line {n + 2}")["problem"]
    assert "not numbers" in problem_at(rep, f"line {n + 3}")["problem"]
    assert "got 2 fields" in problem_at(rep, f"line {n + 4}")["problem"]
    assert "label file without an image" in problem_at(rep, "file")["problem"]
    assert f"{label}: line {n + 1}: class 99" in caplog.text
    for i, s in enumerate(scenes(4)):
        record = caption_file(raw, f"train_scene_{i:03d}")
        expected = [] if i == 3 else [(inst.caption, inst.bbox) for inst in s.instances]
        assert [inst["caption"] for inst in record["instances"]] == [c for c, _ in expected]
        for inst, (_, box) in zip(record["instances"], expected, strict=True):
            assert inst["bbox"] == pytest.approx(list(box), abs=1e-3)


def test_yolo_round_trip(tmp_path):
    src, raw, back = tmp_path / "yolo", tmp_path / "raw", tmp_path / "back"
    names = write_yolo(src, 5)
    (src / "data.yaml").unlink()
    (src / "classes.txt").write_text("\n".join(names) + "\n")
    assert main(["yolo", str(src), str(raw), "--quiet"]) == 0
    assert raw_to_yolo(str(raw), str(back)) == names

    def labels(folder: Path, class_names: list[str]) -> dict:
        out = {}
        for path in sorted(folder.rglob("*.txt")):
            rows = [line.split() for line in path.read_text().splitlines()]
            out[path.stem.replace("train_", "")] = sorted((class_names[int(r[0])], *[round(float(v), 4) for v in r[1:]])
                                                          for r in rows)
        return out

    back_names = yaml.safe_load((back / "data.yaml").read_text())["names"]
    assert labels(back / "labels", back_names) == labels(src / "labels", names)


# ------------------------------------------------------------------------------------------ LayoutSAM

def layoutsam_training_record(i: int, s) -> dict:
    regions = [{"bbox": list(inst.bbox), "description": inst.caption.split()[-1], "detail_description": inst.caption}
               for inst in s.instances]
    return {"image_path": f"sa_{i}.png", "metadata": {
        "image_info": {"file_name": f"sa_{i}.png", "width": TOY_SIZE, "height": TOY_SIZE},
        "global_caption": s.caption, "bbox_info": regions}}


def layoutsam_benchmark_record(i: int, s) -> dict:  # the benchmark's lists are stored as strings
    return {"image_id": i, "file_name": f"sa_{i}.png", "width": TOY_SIZE, "height": TOY_SIZE,
            "global_caption": s.caption, "bbox_list": str([list(inst.bbox) for inst in s.instances]),
            "region_captions": str([inst.caption.split()[-1] for inst in s.instances]),
            "detail_region_captions": json.dumps([inst.caption for inst in s.instances])}


def test_layoutsam_both_forms_and_malformed_records(tmp_path):
    src = tmp_path / "layoutsam"
    src.mkdir()
    shown = scenes(4)
    for i, s in enumerate(shown):
        Image.fromarray(s.image).save(src / f"sa_{i}.png")
    spoiled = layoutsam_training_record(2, shown[2])
    spoiled["metadata"]["bbox_info"][0]["bbox"] = [1, 2, 3]
    no_caption = layoutsam_benchmark_record(3, shown[3])
    del no_caption["global_caption"]
    lengths = layoutsam_benchmark_record(3, shown[3])
    lengths["region_captions"] = "['one']"
    lines = [json.dumps(layoutsam_training_record(0, shown[0])), json.dumps(layoutsam_benchmark_record(1, shown[1])),
             '{"image_path": "sa_9.png", "metadata": ', json.dumps(spoiled), json.dumps(no_caption),
             json.dumps(lengths), ""]
    path = src / "train.jsonl"
    path.write_text("\n".join(lines))
    raw = tmp_path / "raw"
    assert main(["layoutsam", str(path), str(raw), "--quiet"]) == 1

    rep = report(raw)
    assert "malformed JSON" in problem_at(rep, "line 3")["problem"]
    assert "region 0: bbox must be 4 finite numbers" in problem_at(rep, "line 4")["problem"]
    assert "needs a string 'global_caption'" in problem_at(rep, "line 5")["problem"]
    assert "differ in length" in problem_at(rep, "line 6")["problem"]
    assert all(p["file"] == str(path) for p in rep["problems"])
    assert sorted(p.stem for p in (raw / "captions").iterdir()) == ["sa_0", "sa_1", "sa_2"]
    for i in (0, 1):
        record = caption_file(raw, f"sa_{i}")
        assert record["caption"] == shown[i].caption
        assert [(inst["bbox"], inst["caption"], inst["short_caption"]) for inst in record["instances"]] == \
            [(list(map(float, inst.bbox)), inst.caption, inst.caption.split()[-1]) for inst in shown[i].instances]
    assert len(caption_file(raw, "sa_2")["instances"]) == len(shown[2].instances) - 1

    short = tmp_path / "short"
    main(["layoutsam", str(path), str(short), "--quiet", "--region_caption", "short"])
    first = caption_file(short, "sa_0")["instances"][0]
    assert (first["caption"], first["detail_caption"]) == (shown[0].instances[0].caption.split()[-1],
                                                           shown[0].instances[0].caption)


def test_layoutsam_round_trip(tmp_path):
    coco = write_coco(tmp_path / "coco", 4)
    raw, again = tmp_path / "raw", tmp_path / "again"
    main([*coco_args(coco, raw), "--captions", str(coco["captions"])])
    records = raw_to_layoutsam(str(raw))
    (tmp_path / "records.json").write_text(json.dumps(records))  # a JSON list this time
    assert main(["layoutsam", str(tmp_path / "records.json"), str(again), "--images", str(raw / "images"),
                 "--quiet"]) == 0
    for i in range(4):
        first, second = caption_file(raw, f"scene_{i:03d}"), caption_file(again, f"scene_{i:03d}")
        assert (first["caption"], first["instances"]) == (second["caption"], second["instances"])
