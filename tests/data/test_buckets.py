"""Aspect-ratio buckets: the list, the assignment, and boxes that follow the image (on toy renders)."""

import numpy as np
import pytest

from mpp.data.buckets import Buckets, fit_to_bucket, nearest_bucket
from mpp.data.raw import load_raw_sample
from mpp.evaluate import color_mask, mask_box
from mpp.toy.scenes import ToyWorld
from tests.helpers import TOY_SIZE, WIDE_BUCKETS


def test_default_buckets_have_about_r_squared_pixels_in_multiples_of_16():
    at_1024 = Buckets().resolve(1024)
    assert at_1024 == [(656, 1584), (768, 1360), (880, 1184), (1024, 1024), (1184, 880), (1360, 768), (1584, 656)]
    assert all(w % 16 == 0 and h % 16 == 0 and abs(w * h / 1024**2 - 1) < 0.05 for w, h in at_1024)
    assert Buckets().resolve(TOY_SIZE) == [(80, 192), (96, 176), (112, 144), (128, 128), (144, 112), (176, 96),
                                           (192, 80)]
    assert WIDE_BUCKETS.resolve(TOY_SIZE) == [(128, 128), (176, 96), (192, 80)]
    assert Buckets(aspect_ratios=[1.0]).resolve(1024) == [(1024, 1024)]
    explicit = Buckets(sizes=[[1536, 640], [1024, 1024], [1344, 768], [1152, 896]]).resolve(1024)
    assert explicit == [(1024, 1024), (1152, 896), (1344, 768), (1536, 640)]


@pytest.mark.parametrize("buckets, message", [
    (Buckets(aspect_ratios=[0.5]), "--buckets.aspect_ratios"),
    (Buckets(sizes=[[1000, 1024]]), r"--buckets.sizes \[\[1000, 1024\]\].*multiple of 16"),
    (Buckets(aspect_ratios=[]), "no bucket"),
])
def test_bad_bucket_settings_name_the_flag(buckets, message):
    with pytest.raises(ValueError, match=message):
        buckets.resolve(1024)


def test_each_frame_goes_to_the_nearest_aspect_ratio():
    buckets = Buckets().resolve(1024)
    assert nearest_bucket(1920, 1080, buckets) == (1360, 768)  # 16:9
    assert nearest_bucket(1998, 1080, buckets) == (1360, 768)  # 1.85:1
    assert nearest_bucket(4096, 1716, buckets) == (1584, 656)  # 2.39:1
    assert nearest_bucket(1080, 1920, buckets) == (768, 1360)  # portrait
    assert nearest_bucket(640, 480, buckets) == (1184, 880)
    assert nearest_bucket(500, 500, buckets) == (1024, 1024)


def test_the_crop_is_minimal_and_centred():
    fit = fit_to_bucket(1920, 1080, (1360, 768))
    assert fit.resized == (1365, 768) and (fit.left, fit.top) == (2, 0) and fit.kept > 0.99
    square = fit_to_bucket(1920, 1080, (1024, 1024))  # the square-only crop of a 16:9 plate keeps 56 %
    assert square.resized == (1820, 1024) and square.left == 398 and round(square.kept, 2) == 0.56


def _instance_boxes_in(image: np.ndarray, sample, scene) -> None:
    """Each kept instance's colour spans its transformed box in the prepared image (±2.5 px:
    resampling); a clipped one's visible part of its shape lies inside its clipped box."""
    h, w = image.shape[:2]
    kept = [k for k in range(len(scene.instances)) if k not in sample.dropped]
    for box, k in zip(sample.boxes.tolist(), kept, strict=True):
        inst = scene.instances[k]
        found = mask_box(color_mask(image, inst.color, tol=40))
        expected = [box[0] * w, box[1] * h, box[2] * w, box[3] * h]
        assert found is not None, inst.caption
        if k in sample.clipped:
            assert all(found[i] >= expected[i] - 2.5 for i in (0, 1)), (found, expected, inst.caption)
            assert all(found[i] <= expected[i] + 2.5 for i in (2, 3)), (found, expected, inst.caption)
        else:
            assert np.allclose(found, expected, atol=2.5), (found, expected, inst.caption)


@pytest.mark.parametrize("frame, bucket", [((228, 128), (176, 96)), ((306, 128), (192, 80)), ((160, 160), (128, 128))])
def test_boxes_land_on_their_instances_pixels_in_the_bucket(tmp_path, frame, bucket):
    world = ToyWorld(image_size=TOY_SIZE, seed=3, frames=[frame], max_instances=3)
    world.write_raw(str(tmp_path), 6)
    for index in range(6):
        scene = world.scene(index)
        sample = load_raw_sample(str(tmp_path), scene.id, str(tmp_path / "images" / f"{scene.id}.png"),
                                 resolution=TOY_SIZE, buckets=WIDE_BUCKETS.resolve(TOY_SIZE))
        assert sample.bucket == bucket and tuple(sample.image.shape) == (3, bucket[1], bucket[0])
        image = ((sample.image.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()
        _instance_boxes_in(image, sample, scene)


def test_only_instances_that_leave_the_frame_are_dropped_and_cut_ones_are_clipped(tmp_path):
    # 2.39:1 frames forced into a square: the crop keeps the middle 42 %
    world = ToyWorld(image_size=TOY_SIZE, seed=5, frames=[(306, 128)], max_instances=4)
    world.write_raw(str(tmp_path), 12)
    fit = fit_to_bucket(306, 128, (128, 128))
    dropped = clipped = 0
    for index in range(12):
        scene = world.scene(index)
        sample = load_raw_sample(str(tmp_path), scene.id, str(tmp_path / "images" / f"{scene.id}.png"),
                                 resolution=TOY_SIZE, buckets=[(128, 128)], require_instances=False)
        for k, inst in enumerate(scene.instances):
            x0, x1 = (v * fit.resized[0] / 306 - fit.left for v in (inst.bbox[0], inst.bbox[2]))
            visible = min(x1, 128) - max(x0, 0)
            if k in sample.dropped:
                assert visible < 1 or visible < 0.02 * (x1 - x0)
            elif k in sample.clipped:
                assert x0 < 0 or x1 > 128
        dropped += len(sample.dropped)
        clipped += len(sample.clipped)
        image = ((sample.image.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()
        _instance_boxes_in(image, sample, scene)
    assert dropped and clipped  # both happened, so the checks above ran
