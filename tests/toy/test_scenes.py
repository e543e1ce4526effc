import json

import numpy as np
import pytest

from mpp.evaluate import box_iou, color_mask, mask_box
from mpp.toy.scenes import BACKGROUND_TONES, ELEMENT_KINDS, IDENTITY_COLORS, ToyWorld, frames_for

N_SCENES = 200


@pytest.fixture(scope="module")
def world():
    return ToyWorld(seed=0)


@pytest.fixture(scope="module")
def scenes(world):
    return [world.scene(i) for i in range(N_SCENES)]


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_scenes_and_bytes(tmp_path):
    a, b = ToyWorld(seed=3), ToyWorld(seed=3)
    assert a.identities == b.identities
    for i in (0, 1, 17, 123456):
        sa, sb = a.scene(i), b.scene(i)
        assert sa.id == sb.id == f"{i:08d}"
        assert sa.caption == sb.caption and sa.instances == sb.instances
        assert np.array_equal(sa.image, sb.image)
    ids_a = a.write_raw(tmp_path / "a", 6, start=5)
    ids_b = b.write_raw(tmp_path / "b", 6, start=5)
    assert ids_a == ids_b == [f"{i:08d}" for i in range(5, 11)]
    fa, fb = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert fa == fb
    assert sum(k.startswith("images/") for k in fa) == 6


def test_scene_is_pure_function_of_index():
    w = ToyWorld(seed=1)
    later = w.scene(7)
    w.scene(3), w.scene(100)
    assert np.array_equal(w.scene(7).image, later.image)


def test_different_seed_differs():
    a, b = ToyWorld(seed=0), ToyWorld(seed=1)
    assert [i.name for i in a.identities] != [i.name for i in b.identities]
    assert sum(not np.array_equal(a.scene(i).image, b.scene(i).image) for i in range(5)) >= 4


def test_identity_seed_keeps_the_characters_and_changes_the_layouts():
    train, heldout = ToyWorld(seed=0), ToyWorld(seed=1, identity_seed=0)
    assert heldout.identities == train.identities
    assert ToyWorld(**heldout.config).identities == train.identities  # config round-trips
    assert "identity_seed" not in train.config  # a plain world's config (and toy bundle marker) is unchanged
    assert all(a.bbox != b.bbox for a, b in zip(train.scene(0).instances, heldout.scene(0).instances, strict=False))
    used = {i.identity for k in range(20) for i in heldout.scene(k).instances if i.foreground}
    assert used <= {i.name for i in train.identities} and len(used) > 4


def test_identities_distinct():
    w = ToyWorld(seed=0, num_identities=8)
    ids = w.identities
    assert len(ids) == 8
    assert len({(i.shape, i.texture, i.color) for i in ids}) == 8
    assert len({i.color for i in ids}) == 8  # default: one colour per identity
    assert len({i.name for i in ids}) == 8
    assert len({i.shape for i in ids}) == 4 and len({i.texture for i in ids}) == 4
    big = ToyWorld(seed=0, num_identities=40)
    assert len({(i.shape, i.texture, i.color) for i in big.identities}) == 40


def test_palette_separation():
    """Main colours (instances, background tones) are far apart, so segmentation by colour works."""
    mains = list(IDENTITY_COLORS.values()) + [k[3] for k in ELEMENT_KINDS]
    backgrounds = list(BACKGROUND_TONES.values())
    backgrounds += [tuple(round(c * 0.92) for c in t) for t in backgrounds]
    textures = [(0, 0, 0), (255, 255, 255)]
    for i, a in enumerate(mains):
        for b in mains[i + 1 :] + backgrounds + textures:
            assert np.linalg.norm(np.subtract(a, b)) > 90, (a, b)


def test_scene_sanity(world, scenes):
    vocab = set(world.vocabulary())
    names = {i.name for i in world.identities}
    counts, fills, fg = [], [], []
    for s in scenes:
        assert s.image.shape == (128, 128, 3) and s.image.dtype == np.uint8
        assert 1 <= len(s.instances) <= 4
        counts.append(len(s.instances))
        colors = [inst.color for inst in s.instances]
        assert len(set(colors)) == len(colors)
        assert set(world.tokens(s.caption)) <= vocab, s.caption
        for inst in s.instances:
            x0, y0, x1, y1 = inst.bbox
            assert 0 <= x0 < x1 <= 128 and 0 <= y0 < y1 <= 128
            assert min(x1 - x0, y1 - y0) >= world.min_box and max(x1 - x0, y1 - y0) <= world.max_box
            assert set(world.tokens(inst.caption)) <= vocab
            assert inst.caption in s.caption
            if inst.foreground:
                assert inst.identity in names
                assert inst.color == world.identity(inst.identity).color
                assert inst.caption == world.identity(inst.identity).caption
            else:
                assert inst.identity is None
            mask = color_mask(s.image, inst.color, tol=1)
            inside = mask[y0:y1, x0:x1].sum()
            assert inside == mask.sum(), "an instance colour leaks outside its box"
            fills.append(inside / ((x1 - x0) * (y1 - y0)))
            fg.append(inst.foreground)
    fills = np.array(fills)
    print(f"\ncolour fill of boxes: min {fills.min():.2f} mean {fills.mean():.2f}")
    assert fills.min() > 0.3 and fills.mean() > 0.65 and np.mean(fills > 0.5) > 0.9
    assert 0.3 < np.mean(fg) < 0.85
    assert len(set(counts)) == 4


def test_shapes_reach_box_extents(world, scenes):
    """The colour's bounding box is the instance box when nothing is drawn over it."""
    checked = 0
    for s in scenes[:80]:
        for k, inst in enumerate(s.instances):
            later = s.instances[k + 1 :]
            if any(box_iou(inst.bbox, o.bbox) > 0 for o in later):
                continue
            assert mask_box(color_mask(s.image, inst.color, tol=1)) == inst.bbox
            checked += 1
    assert checked > 50


def test_write_raw_format(world, tmp_path):
    ids = world.write_raw(tmp_path, 10)
    for ident in world.identities:
        assert (tmp_path / "refs" / f"{ident.name}.png").is_file()
    from PIL import Image

    for sid in ids:
        img = np.asarray(Image.open(tmp_path / "images" / f"{sid}.png"))
        scene = world.scene(int(sid))
        assert np.array_equal(img, scene.image)
        rec = json.loads((tmp_path / "captions" / f"{sid}.json").read_text())
        assert rec["caption"] == scene.caption
        assert len(rec["instances"]) == len(scene.instances)
        for item, inst in zip(rec["instances"], scene.instances, strict=True):
            assert item["bbox"] == list(inst.bbox) and item["caption"] == inst.caption
            assert item["foreground"] is inst.foreground and item["color"] == list(inst.color)
            if inst.foreground:
                assert (tmp_path / item["reference"]).is_file()
                assert item["reference"] == f"refs/{inst.identity}.png"
            else:
                assert "reference" not in item


def test_reference(world):
    ident = world.identities[0]
    ref = world.reference(ident.name, size=64)
    assert ref.shape == (64, 64, 3) and ref.dtype == np.uint8
    assert color_mask(ref, ident.color, tol=1).mean() > 0.4
    assert np.array_equal(ref, ToyWorld(seed=0).reference(ident.name))


def test_cast_names_the_characters_and_round_trips_through_config():
    cast = ["pink_dotted_hexagon", "orange_solid_cross", "teal_plaid_circle"]
    world = ToyWorld(seed=4, cast=cast)
    assert [i.name for i in world.identities] == cast and world.num_identities == 3
    assert ToyWorld(**world.config).identities == world.identities
    shown = {x.identity for i in range(40) for x in world.scene(i).instances if x.foreground}
    assert shown and shown <= set(cast)
    assert "a orange cross" in {world.identity(n).caption for n in cast}
    with pytest.raises(ValueError, match="color_texture_shape"):
        ToyWorld(cast=["pink_hexagon"])
    with pytest.raises(ValueError, match="distinct"):
        ToyWorld(cast=cast + cast[:1])


def test_widescreen_frames_hold_their_boxes_and_square_worlds_are_unchanged():
    frames = frames_for(128, [1.0, 16 / 9, 2.39])
    assert frames == [(128, 128), (171, 96), (198, 83)]
    wide = ToyWorld(seed=0, frames=frames)
    sizes = set()
    for i in range(30):
        scene = wide.scene(i)
        h, w = scene.image.shape[:2]
        sizes.add((w, h))
        for inst in scene.instances:
            x0, y0, x1, y1 = inst.bbox
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
            assert mask_box(color_mask(scene.image, inst.color, tol=1)) is not None
    assert sizes == set(frames)
    assert ToyWorld(**wide.config).config == wide.config and "frames" not in ToyWorld(seed=0).config
    one = ToyWorld(seed=0, frames=[(128, 128)])  # a single frame draws nothing: the square world's scenes
    assert all(np.array_equal(one.scene(i).image, ToyWorld(seed=0).scene(i).image) for i in range(3))
    with pytest.raises(ValueError, match="shortest frame side"):
        ToyWorld(seed=0, frames=[(200, 60)])


def test_describe_prob_leaves_the_looks_to_the_reference_and_keeps_the_scenes():
    full = ToyWorld(seed=0, num_identities=32)
    half = ToyWorld(seed=0, num_identities=32, describe_prob=0.5)
    none = ToyWorld(seed=0, num_identities=32, describe_prob=0.0)
    described = []
    for i in range(60):
        a, b, c = full.scene(i), half.scene(i), none.scene(i)
        assert np.array_equal(a.image, b.image) and np.array_equal(a.image, c.image)  # same scenes, other words
        for x, y, z in zip(a.instances, b.instances, c.instances, strict=True):
            assert x.bbox == y.bbox == z.bbox and x.identity == y.identity == z.identity
            if not x.foreground:
                assert x.caption == y.caption == z.caption
                continue
            ident = full.identity(x.identity)
            assert x.caption == ident.caption and z.caption == f"a {ident.shape}"
            assert y.caption in (ident.caption, z.caption)
            described.append(y.caption == ident.caption)
            assert z.caption in c.caption
    assert 0.3 < np.mean(described) < 0.7
    assert ToyWorld(**half.config).describe_prob == 0.5 and "describe_prob" not in full.config
    assert all(w in full.vocabulary() for w in none.tokens(none.scene(0).caption))
    with pytest.raises(ValueError, match="describe_prob"):
        ToyWorld(describe_prob=1.5)
