import json
import os
import shutil

import lightning as L
import pytest
import torch
from safetensors.torch import load_file, save_file

from mpp.data.buckets import bucket_of
from mpp.data.layout import read_manifest, sample_path
from mpp.data.sampler import BucketBatchSampler
from mpp.datamodule import MppDataModule
from tests.helpers import TOY_SIZE

# 23 samples in three buckets of 11, 8 and 4
BUCKETS = ["a"] * 11 + ["b"] * 8 + ["c"] * 4
BUCKETS = [BUCKETS[(7 * i) % 23] for i in range(23)]  # interleaved


def _dm(root, settings, **kw):
    kw = {"batch_size": 2, "num_workers": 0, "pin_memory": False, "val_fraction": 0.2, **kw}
    return MppDataModule(root, encoders=settings, resolution=TOY_SIZE, **kw)


def test_batches_are_padded_with_a_mask(toy_prepared, toy_settings):
    dm = _dm(toy_prepared, toy_settings, batch_size=4)
    dm.setup("fit")
    batch = dm.on_before_batch_transfer(next(iter(dm.train_dataloader())), 0)
    n = batch["instance_mask"].shape[1]
    counts = {r["id"]: r["num_instances"] for r in dm.train_records}
    assert n == max(counts[i] for i in batch["ids"])
    for i, sid in enumerate(batch["ids"]):
        assert batch["instance_mask"][i].sum() == counts[sid]
        assert (batch["boxes"][i, counts[sid]:] == 0).all()
    assert batch["latents"].shape == (4, 16, TOY_SIZE // 8, TOY_SIZE // 8)
    assert batch["clip_embeds"].shape[:2] == batch["dino_embeds"].shape[:2] == (4, n)
    assert batch["instance_text"].shape[:2] == (4, n)
    b = batch["boxes"][batch["instance_mask"]]
    assert (b >= 0).all() and (b <= 1).all() and (b[:, 2] > b[:, 0]).all()


def test_train_val_split_is_disjoint_and_stable(toy_prepared, toy_settings):
    dm = _dm(toy_prepared, toy_settings)
    dm.setup("fit")
    train, val = {r["id"] for r in dm.train_records}, {r["id"] for r in dm.val_records}
    assert train and val and not train & val and len(train | val) == 24
    dm2 = _dm(toy_prepared, toy_settings)
    dm2.setup("fit")
    assert {r["id"] for r in dm2.val_records} == val


@pytest.mark.parametrize("world", [1, 2, 3])
def test_ranks_see_disjoint_samples_of_one_bucket_per_step(world):
    shares = [list(BucketBatchSampler(BUCKETS, 2, rank=r, num_replicas=world, seed=5)) for r in range(world)]
    flat = [i for s in shares for batch in s for i in batch]
    per_step = 2 * world
    assert len(flat) == len(set(flat)) == sum(n - n % per_step for n in (11, 8, 4))  # each bucket's remainder dropped
    assert len({len(s) for s in shares}) == 1 == len({len(b) for s in shares for b in s})
    assert len(shares[0]) == len(BucketBatchSampler(BUCKETS, 2, num_replicas=world))
    for step in zip(*shares, strict=True):  # every rank in the same bucket at every step
        assert len({BUCKETS[i] for batch in step for i in batch}) == 1


@pytest.mark.parametrize("world", [1, 2, 3])
def test_validation_batches_keep_every_sample_and_one_bucket_each(world):
    shares = [list(BucketBatchSampler(BUCKETS, 4, rank=r, num_replicas=world, shuffle=False)) for r in range(world)]
    assert {i for s in shares for b in s for i in b} == set(range(23))
    assert len({len(s) for s in shares}) == 1 and len(shares[0]) == len(BucketBatchSampler(
        BUCKETS, 4, num_replicas=world, shuffle=False))
    for step in zip(*shares, strict=True):
        assert len({BUCKETS[i] for batch in step for i in batch}) == 1 and len({len(b) for b in step}) == 1


def test_lightning_sets_the_epoch_and_workers_keep_the_skip():
    """What the trainer does with a DataLoader of this batch sampler: Lightning's `_set_sampler_epoch`
    reaches it, and a resumed epoch's skip survives the two iter() calls of a loader with workers."""
    from lightning.fabric.utilities.data import _set_sampler_epoch

    expected = BucketBatchSampler(BUCKETS, 2, seed=1)
    expected.set_epoch(3)
    expected = list(expected)[4:]
    sampler = BucketBatchSampler(BUCKETS, 2, seed=1)
    loader = torch.utils.data.DataLoader(list(range(23)), batch_sampler=sampler, num_workers=2,
                                         persistent_workers=True)
    _set_sampler_epoch(loader, 3)
    assert sampler.epoch == 3
    sampler.skip(4, epoch=3)
    assert [b.tolist() for b in loader] == expected
    _set_sampler_epoch(loader, 4)  # the next epoch is whole again, in its own order
    following = [b.tolist() for b in loader]
    assert len(following) == len(sampler) and following[:4] != expected[:4]


def test_epochs_shuffle_differently_and_reproducibly():
    s = BucketBatchSampler(BUCKETS, 2, seed=1)
    first = list(s)
    s.set_epoch(1)
    assert list(s) != first
    s.set_epoch(0)
    assert list(s) == first
    assert list(BucketBatchSampler(BUCKETS, 2, seed=2)) != first


def test_prepared_with_other_settings_is_refused(toy_prepared, toy_settings):
    other = type(toy_settings)(**{**toy_settings.to_dict(), "t5_max_length": 64})
    with pytest.raises(ValueError, match="t5_max_length.*32.*64"):
        _dm(toy_prepared, other).setup("fit")
    with pytest.raises(ValueError, match="resolution"):
        MppDataModule(toy_prepared, encoders=toy_settings, resolution=256).setup("fit")


class _Recorder(L.LightningModule):
    """Consumes batches and records which samples it saw, in order."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(32, 1)
        self.seen: list[str] = []

    def training_step(self, batch, batch_idx):
        self.seen.extend(batch["ids"])
        return self.layer(batch["pooled_prompt_embeds"]).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _trainer(tmp_path, **kw):
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, limit_val_batches=0, default_root_dir=str(tmp_path),
                     use_distributed_sampler=False, **kw)


def test_mid_epoch_resume_yields_exactly_the_remaining_samples(toy_prepared, toy_settings, tmp_path):
    full = _Recorder()
    _trainer(tmp_path / "full", max_epochs=2).fit(full, datamodule=_dm(toy_prepared, toy_settings))
    per_epoch = len(full.seen) // 2

    # the checkpoint is written mid-epoch by the callback, as in a real run
    first = _Recorder()
    saver = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    _trainer(tmp_path / "a", max_steps=4, callbacks=[saver]).fit(first, datamodule=_dm(toy_prepared, toy_settings))
    ckpt = str(tmp_path / "ckpt" / "epoch=0-step=3.ckpt")
    assert first.seen == full.seen[:8]

    second = _Recorder()
    _trainer(tmp_path / "b", max_epochs=2).fit(second, datamodule=_dm(toy_prepared, toy_settings), ckpt_path=ckpt)
    assert second.seen == full.seen[6:]
    assert len(full.seen) == 2 * per_epoch


def _damaged_copy(toy_prepared, tmp_path, damage_ids):
    root = tmp_path / "data"
    shutil.copytree(toy_prepared, root)
    for sid, kind in damage_ids:
        if kind == "nan":
            path = sample_path(str(root), "latents", sid)
            nan = torch.full((16, TOY_SIZE // 8, TOY_SIZE // 8), float("nan"), dtype=torch.float16)
            save_file({"latents": nan}, path)
        elif kind == "missing":
            os.unlink(sample_path(str(root), "dino", sid))
        elif kind == "shape":
            save_file({"latents": torch.zeros(16, 4, 4, dtype=torch.float16)}, sample_path(str(root), "latents", sid))
        elif kind == "nan_hidden":  # NaN only where training masks the embedding out (a background instance)
            caption = json.loads(open(sample_path(str(root), "caption", sid)).read())
            k = next(k for k, i in enumerate(caption["instances"])
                     if not i.get("reference") and not i.get("foreground"))
            clip = load_file(sample_path(str(root), "clip", sid))["embeds"].clone()
            clip[k] = float("nan")
            save_file({"embeds": clip}, sample_path(str(root), "clip", sid))
        elif kind == "str_bbox":
            path = sample_path(str(root), "caption", sid)
            caption = json.loads(open(path).read())
            caption["instances"][0]["bbox"] = ["0.1", "0.1", "0.5", "0.5"]
            with open(path, "w") as f:
                json.dump(caption, f)
    return str(root)


def _with_background(root: str, records: list[dict]) -> list[str]:
    """Ids of records with an instance that has neither a reference nor a foreground flag set."""
    ids = []
    for r in records:
        caption = json.loads(open(sample_path(root, "caption", r["id"])).read())
        if any(not i.get("reference") and not i.get("foreground") for i in caption["instances"]):
            ids.append(r["id"])
    return ids


def test_bad_records_are_skipped_logged_and_counted(toy_prepared, toy_settings, tmp_path, caplog):
    dm0 = _dm(toy_prepared, toy_settings)
    dm0.setup("fit")
    background = _with_background(str(toy_prepared), dm0.train_records)
    ids = [r["id"] for r in dm0.train_records if r["id"] not in background[:1]][:4] + background[:1]
    damage = [(ids[0], "nan"), (ids[1], "missing"), (ids[2], "shape"), (ids[3], "str_bbox"), (ids[4], "nan_hidden")]
    dm = _dm(_damaged_copy(toy_prepared, tmp_path, damage), toy_settings, max_bad_records=5, batch_size=1)
    dm.setup("fit")
    seen = []
    for batch in dm.train_dataloader():
        seen += dm.on_before_batch_transfer(batch, 0)["ids"]
    assert set(dm.bad_records) == set(ids)
    assert not set(seen) & set(ids)
    assert "non-finite" in dm.bad_records[ids[0]] and "No such file" in dm.bad_records[ids[1]]
    assert "manifest says" in dm.bad_records[ids[2]]
    assert "instance 0 bbox must be 4 numbers, got ['0.1'" in dm.bad_records[ids[3]]
    assert dm.bad_records[ids[4]] == "ValueError: clip_embeds holds non-finite values"
    assert all(sid in caplog.text for sid in ids)


def test_too_many_bad_records_stop_the_run_with_the_list(toy_prepared, toy_settings, tmp_path):
    dm0 = _dm(toy_prepared, toy_settings)
    dm0.setup("fit")
    ids = [r["id"] for r in dm0.train_records]
    dm = _dm(_damaged_copy(toy_prepared, tmp_path, [(i, "missing") for i in ids[:3]]), toy_settings, max_bad_records=2,
             batch_size=1)
    dm.setup("fit")
    with pytest.raises(RuntimeError, match="exceed data.max_bad_records=2") as e:
        for batch in dm.train_dataloader():
            dm.on_before_batch_transfer(batch, 0)
    assert all(i in str(e.value) for i in ids[:3])


def test_toy_prepare_data_builds_the_dataset(tmp_path, toy_models):
    from mpp.toy.bundle import toy_encoder_settings
    from mpp.toy.prepare import ToyData

    dm = MppDataModule(str(tmp_path / "toy"), encoders=toy_encoder_settings(toy_models), resolution=TOY_SIZE,
                       toy=ToyData(models_dir=toy_models, num_samples=10, image_size=TOY_SIZE, pretrain_steps=0,
                                   vision_steps=0, num_identities=8), num_workers=0,
                       val_fraction=0.3)
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.train_records) + len(dm.val_records) == 10
    assert len(read_manifest(str(tmp_path / "toy" / "manifest.jsonl"))) == 10


def test_skip_applies_only_to_the_interrupted_epoch():
    s = BucketBatchSampler(BUCKETS, 2, seed=3)
    s.set_epoch(2)
    full = list(s)
    s.skip(3, epoch=2)
    assert list(s) == full[3:]
    assert list(s) == full  # once
    s.skip(len(full), epoch=2)  # the interrupted epoch had ended: Lightning moves on to the next one
    s.set_epoch(3)
    assert len(list(s)) == len(full)


def test_a_batch_never_mixes_buckets(toy_wide_prepared, toy_settings):
    dm = _dm(toy_wide_prepared, toy_settings, batch_size=2)
    dm.setup("fit")
    bucket = {r["id"]: bucket_of(r) for r in dm.train_records + dm.val_records}
    seen = set()
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        for raw in loader:
            batch = dm.on_before_batch_transfer(raw, 0)
            (size,) = {bucket[i] for i in batch["ids"]}
            assert batch["latents"].shape[-2:] == (size[1] // 8, size[0] // 8)
            seen.add(size)
    assert seen == {(128, 128), (176, 96), (192, 80)}


def test_mid_epoch_resume_with_buckets_yields_exactly_the_remaining_batches(toy_wide_prepared, toy_settings,
                                                                             tmp_path):
    full = _Recorder()
    _trainer(tmp_path / "full", max_epochs=2).fit(full, datamodule=_dm(toy_wide_prepared, toy_settings))
    saver = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    first = _Recorder()
    _trainer(tmp_path / "a", max_steps=4, callbacks=[saver]).fit(first,
                                                                 datamodule=_dm(toy_wide_prepared, toy_settings))
    second = _Recorder()
    _trainer(tmp_path / "b", max_epochs=2).fit(second, datamodule=_dm(toy_wide_prepared, toy_settings),
                                               ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=3.ckpt"))
    assert first.seen == full.seen[:8] and second.seen == full.seen[6:]
    assert len({r["id"] for r in read_manifest(os.path.join(toy_wide_prepared, "manifest.jsonl"))
                if r["id"] in full.seen and bucket_of(r)[0] > 128}) > 0  # the run crossed buckets


def test_pack_round_trips_a_batch(toy_prepared, toy_settings):
    from mpp.data.dataset import PreparedDataset, collate, pack, unpack

    dm = _dm(toy_prepared, toy_settings)
    dm.setup("fit")
    ds = PreparedDataset(toy_prepared, dm.train_records)
    batch = collate([ds[i] for i in range(3)])
    restored = unpack(pack(dict(batch)))
    assert restored.keys() == batch.keys()
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            assert restored[k].dtype == v.dtype and torch.equal(restored[k], v), k
        else:
            assert restored[k] == v


def test_relative_and_absolute_paths_to_the_same_encoders_agree(toy_prepared, toy_settings, tmp_path, monkeypatch):
    monkeypatch.chdir(os.path.dirname(toy_settings.flux))
    name = os.path.basename(toy_settings.flux)
    relative = type(toy_settings)(**{**toy_settings.to_dict(), "flux": name,
                                     "clip_vision": os.path.join(name, "image_encoder"),
                                     "dino": os.path.join(name, "dino")})
    _dm(toy_prepared, relative).setup("fit")  # prepared with absolute paths, configured with relative ones


def test_instance_roles_follow_the_flag_else_the_reference():
    from mpp.data.dataset import instance_roles

    roles = instance_roles([{"foreground": True}, {"foreground": False, "reference": "refs/a.png"},
                            {"reference": "refs/b.png"}, {"reference": None}, {}])
    assert roles.tolist() == [1.0, 0.0, 1.0, -1.0, -1.0]


def test_batches_carry_the_toy_roles(toy_prepared, toy_settings):
    dm = MppDataModule(root=toy_prepared, resolution=TOY_SIZE, batch_size=4, num_workers=0, val_fraction=0.2,
                       encoders=toy_settings)
    dm.setup("fit")
    batch = dm.on_before_batch_transfer(next(iter(dm.train_dataloader())), 0)
    valid = batch["instance_mask"]
    assert set(batch["foreground"][valid].tolist()) <= {0.0, 1.0}  # every toy instance is labelled
    assert (batch["foreground"][valid] == 1).any() and (batch["foreground"][valid] == 0).any()
