"""Reliability under real schedulers (docs/reliability.md): non-finite training, bad data under DDP,
resumable scripts, disk use, preemption. Training runs through the real CLI on the toy world."""

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from mpp.__main__ import main as mpp_main
from mpp.callbacks.preemption import PREEMPTED_EXIT
from mpp.checkpoints import AtomicCheckpointIO, NonFiniteError, is_loadable, latest_checkpoint, load_checkpoint
from mpp.cli import main
from mpp.data.buckets import bucket_of
from mpp.data.layout import sample_path
from mpp.data.sampler import BucketBatchSampler
from tests.helpers import ROOT, fit_args


def _ckpts(folder):
    return sorted(glob.glob(os.path.join(folder, "*.ckpt")))


def _all_finite(path):
    ckpt = load_checkpoint(path)
    return all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


def test_a_diverging_run_stops_naming_step_rank_and_samples_and_saves_nothing_non_finite(in_tmp, toy_models,
                                                                                          toy_prepared):
    with pytest.raises(NonFiniteError) as e:
        # no validation: it would see the divergence first when the weights blow up before a gradient does
        main(fit_args(1, toy_models, toy_prepared, "--model.lr=1e10", "--model.warmup_steps=0",
                      "--trainer.max_steps=8", "--trainer.limit_val_batches=0"))
    message = str(e.value)
    step = int(re.search(r"at optimizer step (\d+)", message).group(1))
    assert 1 < step <= 8 and "rank 0:" in message
    ids = re.search(r"samples \[([^\]]+)\]", message).group(1)
    assert ids.count("'") >= 2  # the batch's sample ids, quoted
    folder = in_tmp / "runs/checkpoints/stage1"
    saved = _ckpts(folder)
    assert [os.path.basename(p) for p in saved] == [f"step={s:07d}.ckpt" for s in range(1, step)]
    assert all(_all_finite(p) for p in saved)
    assert not (in_tmp / "runs/export").exists() and not (folder / "final.ckpt").exists()

    # discovery skips a non-finite checkpoint placed in the folder, even at a higher step
    newest = saved[-1]
    poisoned = load_checkpoint(newest)
    name = sorted(poisoned["state_dict"])[0]
    poisoned["state_dict"][name] = torch.full_like(poisoned["state_dict"][name], float("nan"))
    poisoned["global_step"] = 99
    torch.save(poisoned, folder / "step=0000099.ckpt")
    assert not is_loadable(str(folder / "step=0000099.ckpt"))
    assert latest_checkpoint(str(folder)) == newest
    # and the checkpoint writer refuses one, whoever calls it
    with pytest.raises(NonFiniteError, match=re.escape(name)):
        AtomicCheckpointIO().save_checkpoint(poisoned, folder / "step=0000100.ckpt")
    assert not (folder / "step=0000100.ckpt").exists()


def test_a_non_finite_validation_loss_stops_the_run_before_anything_is_ranked_by_it(in_tmp, toy_models,
                                                                                     toy_prepared):
    with pytest.raises(NonFiniteError, match=r"validation val/loss is nan after global step 2"):
        main(fit_args(1, toy_models, toy_prepared, "--trainer.callbacks+=tests.helpers.PoisonBeforeValidation"))
    saved = _ckpts(in_tmp / "runs/checkpoints/stage1")
    assert [os.path.basename(p) for p in saved] == ["step=0000001.ckpt", "step=0000002.ckpt"]
    assert all(_all_finite(p) for p in saved)


def test_a_non_finite_validation_loss_with_dataloader_workers_ends_the_process(tmp_path, toy_models, toy_prepared):
    """With 2 DataLoader workers (which ignore SIGTERM) the process used to print the error and then
    wait for ever at exit for the workers, that the traceback kept alive."""
    args = fit_args(1, toy_models, toy_prepared, "--trainer.callbacks+=tests.helpers.PoisonBeforeValidation",
                    "--data.num_workers=2")
    start = time.monotonic()
    run = subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), *args], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHONPATH": ROOT})
    assert run.returncode == 2, run.stderr[-3000:]
    assert "validation val/loss is nan after global step 2" in run.stderr.splitlines()[-2]
    assert time.monotonic() - start < 60


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a 30 MB tmpfs (root only; .ci/run runs as root)")
def test_a_full_disk_is_one_line_naming_the_checkpoint_folder_and_the_bytes(tmp_path, toy_models, toy_prepared):
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=30m", "tmpfs", str(disk)], check=True)
    try:
        args = fit_args(1, toy_models, toy_prepared, "--trainer.max_steps=40", f"--checkpoint.dirpath={disk}",
                        "--images.every_n_steps=1000")
        run = subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), *args], cwd=tmp_path,
                             capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": ROOT})
        assert run.returncode == 2, run.stderr[-3000:]
        line = run.stderr.splitlines()[-2]
        assert re.fullmatch(rf"mpp: error: no space left in {disk} writing step=\d+\.ckpt \(about \d+ bytes "
                            r"needed, \d+ free\)", line), line
        assert "Traceback" not in run.stderr and not [p for p in os.listdir(disk) if p.startswith(".tmp-")]
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def _trainable(path, keys):
    state = load_checkpoint(path)["state_dict"]
    return {k: state[k] for k in keys}


@pytest.mark.parametrize("budget", [0, 1])
def test_non_finite_gradients_stop_the_run_or_skip_within_the_budget(in_tmp, toy_models, toy_prepared, budget):
    """Micro-batch 3 (step 2 at accumulation 2) gets NaN gradients: without a budget the run stops
    before applying them; with model.max_skipped_steps=1 step 2 changes nothing and the run goes on."""
    args = fit_args(1, toy_models, toy_prepared, f"--model.max_skipped_steps={budget}", "--trainer.max_steps=4",
                    overlays=("tests/conf/fast.yaml", "tests/conf/poison.yaml"))
    folder = in_tmp / "runs/checkpoints/stage1"
    if budget == 0:
        with pytest.raises(NonFiniteError, match=r"at optimizer step 2 .*rank 0: gradient norm nan over samples \['"):
            main(args)
        assert [os.path.basename(p) for p in _ckpts(folder)] == ["step=0000001.ckpt"]
        return
    cli = main(args)
    assert cli.trainer.global_step == 4
    keys = sorted(cli.model.trainable_keys())
    one, two, three = (_trainable(folder / f"step={s:07d}.ckpt", keys) for s in (1, 2, 3))
    assert all(torch.equal(one[k], two[k]) for k in keys)  # the skipped step applied nothing
    assert any(not torch.equal(two[k], three[k]) for k in keys)  # the next one trained
    assert load_checkpoint(folder / "final.ckpt")["callbacks"]["NonFiniteGuard"]["skipped"] == [2]
    assert all(_all_finite(p) for p in _ckpts(folder))


def _ddp(in_tmp, toy_models, data, *extra):
    out = in_tmp / "ranks"
    args = fit_args(1, toy_models, data, "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.max_steps=2",
                    *extra, overlays=("tests/conf/fast.yaml", "tests/conf/ranks.yaml"))
    env = {**os.environ, "MPP_RECORD_DIR": str(out), "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), *args], env=env, timeout=600,
                          capture_output=True, text=True)
    return proc, out


def _first_batch_of_rank(data, toy_settings, rank):
    from mpp.datamodule import MppDataModule

    dm = MppDataModule(data, encoders=toy_settings, resolution=128, batch_size=2, val_fraction=0.2, num_workers=0)
    dm.setup("fit")
    share = BucketBatchSampler([bucket_of(r) for r in dm.train_records], 2, rank=rank, num_replicas=2, seed=0)
    return [dm.train_records[i]["id"] for i in share.batches()[0]]


@pytest.mark.slow
def test_an_all_bad_batch_on_one_rank_keeps_ddp_in_step(in_tmp, toy_models, toy_prepared, toy_settings):
    """Rank 1's first batch loses both records: it takes part in the step with a zero-weighted stand-in,
    both ranks finish the same steps, and both count the bad ids; past data.max_bad_records every
    rank stops at the same batch (no hang)."""
    data = in_tmp / "data"
    shutil.copytree(toy_prepared, data)
    bad = _first_batch_of_rank(str(data), toy_settings, rank=1)
    for sid in bad:
        os.unlink(sample_path(str(data), "dino", sid))
    proc, out = _ddp(in_tmp, toy_models, str(data))
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.load(open(out / f"rank{r}.json")) for r in (0, 1))
    assert r0["steps"] == r1["steps"] == 2
    assert len(r0["losses"]) == len(r1["losses"]) == 4
    assert r1["losses"][0] == 0.0 and not set(bad) & set(r1["ids"]) and len(r1["ids"]) == 6
    assert r0["bad"] == r1["bad"] == sorted(bad)  # counted on every rank
    assert all(f"skipping bad record {sid}" in proc.stderr for sid in bad)

    proc, _ = _ddp(in_tmp, toy_models, str(data), "--data.max_bad_records=1")
    assert proc.returncode != 0
    assert "exceed data.max_bad_records=1" in proc.stderr and all(sid in proc.stderr for sid in bad)


def _names(folder):
    return sorted(os.listdir(folder))


def test_restarts_leave_no_temporaries_and_at_most_the_configured_checkpoints(in_tmp, toy_models, toy_prepared):
    """A first run kept every checkpoint (another config); a write was killed, leaving its temporary.
    The restart keeping the last 2 removes the temporary and rotates out what the first run wrote."""
    folder = in_tmp / "runs/checkpoints/stage1"
    main(fit_args(1, toy_models, toy_prepared, "--trainer.max_steps=3", "--best_checkpoint.save_top_k=0"))
    assert _names(folder) == ["final.ckpt", "step=0000001.ckpt", "step=0000002.ckpt", "step=0000003.ckpt"]
    (folder / ".tmp-k1ll3dstep=0000004.ckpt").write_bytes(b"half a checkpoint")
    os.unlink(folder / "final.ckpt")  # the first run was killed before its end
    keep = ("tests/conf/fast.yaml", "tests/conf/keep.yaml")
    main(fit_args(1, toy_models, toy_prepared, "--trainer.max_steps=4", f"--ckpt_path={folder / 'step=0000003.ckpt'}",
                  overlays=keep))
    assert _names(folder) == ["final.ckpt", "step=0000003.ckpt", "step=0000004.ckpt"]
    # and again: a restart of the same config rotates out the checkpoint it resumed from
    main(fit_args(1, toy_models, toy_prepared, "--trainer.max_steps=7", f"--ckpt_path={folder / 'step=0000004.ckpt'}",
                  overlays=keep))
    assert _names(folder) == ["final.ckpt", "step=0000006.ckpt", "step=0000007.ckpt"]


def test_malformed_records_are_named_and_skipped(tmp_path, toy_prepared, toy_settings, caplog):
    """Damage that used to crash collate or a worker, or trained silently: each record is named with
    its reason and skipped; a duplicated manifest record trains once."""
    import logging

    from safetensors.torch import load_file, save_file

    from mpp.data.layout import read_manifest, write_manifest
    from mpp.datamodule import MppDataModule

    root = tmp_path / "data"
    shutil.copytree(toy_prepared, root)
    dm = MppDataModule(str(root), encoders=toy_settings, resolution=128, batch_size=4, val_fraction=0.2, num_workers=0)
    dm.setup("fit")
    ids = [r["id"] for r in dm.train_records]

    def rewrite(sid, kind, change):
        path = sample_path(str(root), kind, sid)
        tensors = load_file(path)
        change(tensors)
        save_file(tensors, path)

    rewrite(ids[0], "clip", lambda t: t.update(embeds=torch.zeros(t["embeds"].shape[0], 7, dtype=torch.float16)))
    rewrite(ids[1], "text", lambda t: t.update(prompt_embeds=t["prompt_embeds"][:5].clone()))
    rewrite(ids[2], "latents", lambda t: t.update(latents=t["latents"].long()))
    with open(sample_path(str(root), "caption", ids[3]), "w") as f:
        json.dump([{"bbox": [0, 0, 1, 1]}], f)
    manifest = str(root / "manifest.jsonl")
    records = read_manifest(manifest)
    write_manifest(manifest, records + [r for r in records if r["id"] == ids[4]])

    dm = MppDataModule(str(root), encoders=toy_settings, resolution=128, batch_size=1, val_fraction=0.2, num_workers=0,
                       max_bad_records=10)
    with caplog.at_level(logging.WARNING):
        dm.setup("fit")
        seen = []
        for batch in dm.train_dataloader():
            seen += dm.on_before_batch_transfer(batch, 0)["ids"]
    assert sorted(dm.bad_records) == sorted(ids[:4])
    assert "clip_embeds has shape" in dm.bad_records[ids[0]] and "N×32" in dm.bad_records[ids[0]]
    assert "prompt_embeds has shape [5," in dm.bad_records[ids[1]] and "32×" in dm.bad_records[ids[1]]
    assert "latents is torch.int64" in dm.bad_records[ids[2]]
    assert "caption JSON must be an object" in dm.bad_records[ids[3]]
    assert all(sid in caplog.text for sid in ids[:4])
    assert "more than one record" in caplog.text and ids[4] in caplog.text
    assert [r["id"] for r in dm.train_records] == ids  # one record per id, in place
    assert sorted(seen) == sorted(ids[4:])  # an epoch: every good sample once


def _files(root):
    return {os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs}


def test_hostile_layout_ids_stay_in_the_output_folder_and_the_report_is_always_written(tmp_path, monkeypatch,
                                                                                        toy_models, toy_prepared):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    args = fit_args(1, toy_models, toy_prepared, "--trainer.max_steps=1")
    main(args)
    ckpt = work / "runs/checkpoints/stage1/step=0000001.ckpt"
    box = [{"bbox": [0.1, 0.1, 0.6, 0.6], "caption": "a red square"}]
    ids = ["../../evil", str(tmp_path / "abs_evil"), "", "shots/x1", ".hidden", "dup", "dup", "DUP", "ok", "nanbox"]
    lines = [{"id": sid, "prompt": "a red square", "instances": box} for sid in ids]
    lines[-1]["instances"] = [{"bbox": [0.1, float("nan"), 0.6, 0.6]}]
    os.mkfifo(work / "fifo.png")  # a reference that would block its reader for ever
    lines.append({"id": "fifo", "prompt": "a red square", "instances": [{**box[0], "reference": "fifo.png"}]})
    (work / "layouts.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    flags = args[1:]
    configs = [x for i, a in enumerate(flags) if a == "--config" for x in ("--config", flags[i + 1])]
    overrides = [a for a in flags if a.startswith("--") and a != "--config" and "=" in a]
    before = _files(tmp_path)
    assert mpp_main(["generate", *configs, "--ckpt_path", str(ckpt), "--layouts", "layouts.jsonl", "--out", "out",
                     "--steps", "1", *overrides]) == 1  # bad lines: the report says which
    written = _files(tmp_path) - before
    assert all(p.startswith(os.path.join("a", "b", "out") + os.sep) for p in written), written
    report = json.load(open(work / "out/generated.json"))
    images = {r["id"]: r["image"] for r in report["images"]}
    assert images == {"../../evil": "_.._evil.png", str(tmp_path / "abs_evil"): "_" + "_".join(
        str(tmp_path / "abs_evil").strip("/").split("/")) + ".png", "line00003": "line00003.png",
        "shots/x1": "shots_x1.png", ".hidden": "hidden.png", "dup": "dup.png", "ok": "ok.png"}
    assert {r["image"] for r in report["images"]} | {r["image_with_boxes"] for r in report["images"]} | {
        "generated.json"} == set(os.listdir(work / "out"))
    errors = {int(e.split(":")[1]): e for e in report["errors"]}
    assert sorted(errors) == [7, 8, 10, 11]
    assert "repeats line 6" in errors[7] and "repeats line 6" in errors[8] and "not finite" in errors[10]
    assert errors[11].endswith(f"{work / 'fifo.png'}: not a regular file (a FIFO, device, socket or folder)")

    # interrupted (Ctrl-C) after its first images: the report still lists what was written, and why it stopped
    (work / "many.jsonl").write_text("".join(json.dumps({"id": f"s{i}", "prompt": "a red square", "instances": box})
                                             + "\n" for i in range(3000)))
    proc = subprocess.Popen([sys.executable, "-m", "mpp", "generate", *configs, "--ckpt_path", str(ckpt), "--layouts",
                             "many.jsonl", "--out", "out2", "--steps", "1", *overrides],
                            env={**os.environ, "PYTHONPATH": ROOT}, stderr=subprocess.PIPE, text=True,
                            # a background job inherits SIGINT ignored; Ctrl-C must reach this one
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    # s2.png appears only once s1's record is in the report's list (a file exists from the moment it is
    # opened, so waiting for s1_boxes.png raced with the append under a loaded CPU)
    while not (work / "out2/s2.png").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0, err[-2000:]
    report = json.load(open(work / "out2/generated.json"))
    done = len(report["images"])
    assert 2 <= done < 3000 and report["errors"] == [f"stopped after {done} of 3000 layouts: KeyboardInterrupt: "]
    assert {f"s{i}.png" for i in range(done)} <= set(os.listdir(work / "out2"))


def _fit_process(cwd, toy_models, toy_prepared, record, *extra, signal_args=(), launcher=()):
    """main.py fit in its own process group (as a scheduler starts it), under `launcher` (python
    arguments before main.py, e.g. `mpp launch`'s); returns the finished process."""
    os.makedirs(cwd, exist_ok=True)
    args = fit_args(1, toy_models, toy_prepared, *extra, *signal_args,
                    overlays=("tests/conf/fast.yaml", "tests/conf/preempt_ranks.yaml"))
    env = {**os.environ, "MPP_RECORD_DIR": str(record), "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *launcher, os.path.join(ROOT, "main.py"), *args], cwd=cwd, env=env,
                          timeout=600, capture_output=True, text=True, start_new_session=True)


def _records(folder, ranks=1):
    return [json.load(open(os.path.join(folder, f"rank{r}.json"))) for r in range(ranks)]


def _preempt_and_rerun(tmp_path, toy_models, toy_prepared, extra, signal_args, ranks, max_steps, stopped_at,
                       launcher=()):
    full = _fit_process(tmp_path / "full", toy_models, toy_prepared, tmp_path / "rec_full", *extra,
                        f"--trainer.max_steps={max_steps}", launcher=launcher)
    assert full.returncode == 0, full.stderr[-3000:]
    first = _fit_process(tmp_path / "run", toy_models, toy_prepared, tmp_path / "rec_first", *extra,
                         f"--trainer.max_steps={max_steps}", signal_args=signal_args, launcher=launcher)
    assert first.returncode == PREEMPTED_EXIT, first.stderr[-3000:]
    assert "killed by signal" not in first.stderr
    ckpt = tmp_path / "run/runs/checkpoints/stage1/preempted.ckpt"
    assert torch.load(ckpt, weights_only=False)["global_step"] == stopped_at
    assert not (tmp_path / "run/runs/checkpoints/stage1/final.ckpt").exists()
    second = _fit_process(tmp_path / "run", toy_models, toy_prepared, tmp_path / "rec_second", *extra,
                          f"--trainer.max_steps={max_steps}", f"--ckpt_path={ckpt}", launcher=launcher)
    assert second.returncode == 0, second.stderr[-3000:]
    for a, b, c in zip(_records(tmp_path / "rec_full", ranks), _records(tmp_path / "rec_first", ranks),
                       _records(tmp_path / "rec_second", ranks), strict=True):
        assert b["steps"] == stopped_at and c["steps"] == a["steps"] == max_steps
        assert b["ids"] + c["ids"] == a["ids"]
        assert b["losses"] + c["losses"] == a["losses"]


@pytest.mark.slow
def test_sigterm_to_the_process_group_with_dataloader_workers_saves_and_resumes_exactly(tmp_path, toy_models,
                                                                                        toy_prepared):
    """SIGTERM to the whole group (trainer and its 2 DataLoader workers) as micro-batch 5 starts, the
    first of step 3: step 3 completes, preempted.ckpt, exit 75; the rerun continues exactly."""
    _preempt_and_rerun(tmp_path, toy_models, toy_prepared, ["--data.num_workers=2"],
                       ["--trainer.callbacks.batch=5", "--trainer.callbacks.group=true",
                        f"--trainer.callbacks.signum={int(signal.SIGTERM)}"], ranks=1, max_steps=6, stopped_at=3)


@pytest.mark.slow
def test_sigterm_to_a_torchrun_launched_ddp_run_exits_75_and_resumes_exactly(tmp_path, toy_models, toy_prepared):
    """`mpp launch` (torchrun, 2 processes) SIGTERMed with its whole group as micro-batch 3 starts:
    both ranks save at step 2 and the launcher exits 75, where torchrun alone exits 1."""
    _preempt_and_rerun(tmp_path, toy_models, toy_prepared, ["--trainer.strategy=ddp", "--trainer.devices=2"],
                       ["--trainer.callbacks.batch=3", "--trainer.callbacks.group=true", "--trainer.callbacks.rank=0",
                        f"--trainer.callbacks.signum={int(signal.SIGTERM)}"], ranks=2, max_steps=4, stopped_at=2,
                       launcher=["-m", "mpp", "launch", "--standalone", "--nproc_per_node", "2"])


@pytest.mark.slow
def test_sigusr1_to_one_rank_of_a_ddp_run_stops_every_rank_and_resumes_exactly(tmp_path, toy_models, toy_prepared):
    """SIGUSR1 reaches rank 1 only, as micro-batch 3 (the first of step 2) starts: both ranks finish
    step 2 and stop together, rank 0 exits 75, and the rerun continues both ranks exactly."""
    _preempt_and_rerun(tmp_path, toy_models, toy_prepared, ["--trainer.strategy=ddp", "--trainer.devices=2"],
                       ["--trainer.callbacks.batch=3", "--trainer.callbacks.rank=1",
                        f"--trainer.callbacks.signum={int(signal.SIGUSR1)}"], ranks=2, max_steps=4, stopped_at=2)


def _project(tmp_path, toy_models, toy_prepared):
    """A copy of the shipped scripts and configs, and the arguments that make every stage a short toy
    run (a checkpoint every step, no image logging)."""
    import yaml

    shutil.copytree(os.path.join(ROOT, "scripts"), tmp_path / "scripts")
    for name in ("train.sh", "train_stage1.sh", "train_stage2.sh", "train_stage3.sh", "main.py"):
        shutil.copy2(os.path.join(ROOT, name), tmp_path / name)
    shutil.copytree(os.path.join(ROOT, "configs"), tmp_path / "configs")
    (tmp_path / "short.yaml").write_text(yaml.safe_dump({
        "trainer": {"max_steps": 3, "accumulate_grad_batches": 2, "val_check_interval": 4, "limit_val_batches": 1,
                    "enable_progress_bar": False, "enable_model_summary": False},
        "model": {"heads": {"lora_rank": 4, "identity_dim": 16}},
        "data": {"num_workers": 0, "batch_size": 2, "val_fraction": 0.2, "toy": None},
        "checkpoint": {"every_n_train_steps": 1}, "best_checkpoint": {"save_top_k": 0},
        "images": {"every_n_steps": 1_000_000}}))
    args = fit_args(1, toy_models, toy_prepared, overlays=())[1:]  # drop "fit"
    configs = [os.path.join(ROOT, "configs/toy.yaml"), str(tmp_path / "short.yaml")]
    return [*[x for c in configs for x in ("--config", c)], *[a for a in args[4:]]]


@pytest.mark.slow
def test_train_sh_killed_in_stage_1_resumes_it_then_runs_stages_2_and_3(tmp_path, toy_models, toy_prepared):
    args = _project(tmp_path, toy_models, toy_prepared)
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}

    def train(*extra):
        return subprocess.run(["bash", str(tmp_path / "train.sh"), *args, *extra], cwd=tmp_path, env=env, timeout=900,
                              capture_output=True, text=True, start_new_session=True)

    # SIGKILL to the whole process group (train.sh included) as stage 1's 5th micro-batch starts: step 2 is saved
    killed = train("--trainer.callbacks+=tests.helpers.SignalAt", "--trainer.callbacks.batch=5",
                   f"--trainer.callbacks.signum={int(signal.SIGKILL)}", "--trainer.callbacks.group=true")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    folder = tmp_path / "runs/checkpoints"
    assert latest_checkpoint(str(folder / "stage1")) == str(folder / "stage1/step=0000002.ckpt")
    assert not (folder / "stage2").exists()

    rerun = train()
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "stage 1 resumes runs/checkpoints/stage1/step=0000002.ckpt" in rerun.stderr
    assert "stage 2 starts from runs/checkpoints/stage1/final.ckpt" in rerun.stderr
    assert "stage 3 starts from runs/checkpoints/stage2/final.ckpt" in rerun.stderr
    for stage in (1, 2, 3):
        final = load_checkpoint(folder / f"stage{stage}/final.ckpt")
        assert final["global_step"] == 3 and final["mpp"]["stage"] == stage
        assert (tmp_path / f"runs/export/stage{stage}/heads.safetensors").exists()
    assert len(glob.glob(str(tmp_path / "runs/logs/stage1_*"))) == 1  # the resumed stage 1 kept its folder

    again = train()
    assert again.returncode == 0
    assert all(f"stage {s} is finished" in again.stderr for s in (1, 2, 3))


def test_resuming_with_another_split_or_shuffle_is_refused(toy_prepared, toy_settings):
    from mpp.datamodule import MppDataModule

    state = MppDataModule(toy_prepared, encoders=toy_settings, val_fraction=0.2).state_dict()
    MppDataModule(toy_prepared, encoders=toy_settings, val_fraction=0.2).load_state_dict(state)
    with pytest.raises(ValueError, match=r"data.val_fraction=0.3 differs from the checkpoint's 0.2"):
        MppDataModule(toy_prepared, encoders=toy_settings, val_fraction=0.3).load_state_dict(state)
    with pytest.raises(ValueError, match=r"data.seed=1 differs"):
        MppDataModule(toy_prepared, encoders=toy_settings, val_fraction=0.2, seed=1).load_state_dict(state)


def test_preparation_names_a_non_utf8_caption_and_refuses_tiny_images_and_warns_on_elongated_ones(
        tmp_path, toy_raw, toy_settings, caplog):
    import logging

    import numpy as np
    from PIL import Image

    from mpp.prepare import prepare_dataset

    raw = tmp_path / "raw"
    shutil.copytree(toy_raw, raw)
    ids = sorted(p[:-4] for p in os.listdir(raw / "images"))[:5]
    keep = set(ids)
    for name in os.listdir(raw / "images"):  # five samples are enough
        if name[:-4] not in keep:
            os.unlink(raw / "images" / name)
    (raw / "captions" / f"{ids[0]}.json").write_bytes(b'{"caption": "caf\\xe9 "}'.replace(b"\\xe9", b"\xe9"))
    caption = {"caption": "x", "instances": [{"bbox": [0, 0, 1, 1], "caption": "a dot"}]}
    Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(raw / "images" / f"{ids[1]}.png")
    (raw / "captions" / f"{ids[1]}.json").write_text(json.dumps(caption))
    Image.fromarray(np.zeros((4, 20000, 3), np.uint8)).save(raw / "images" / f"{ids[2]}.png")
    (raw / "captions" / f"{ids[2]}.json").write_text(json.dumps(caption))
    Image.fromarray(np.zeros((128, 640, 3), np.uint8)).save(raw / "images" / f"{ids[3]}.png")
    wide = {"caption": "x", "instances": [{"bbox": [300, 10, 340, 100], "caption": "a box"}]}
    (raw / "captions" / f"{ids[3]}.json").write_text(json.dumps(wide))
    with caplog.at_level(logging.WARNING):
        result = prepare_dataset(str(raw), str(tmp_path / "out"), encoders=toy_settings, resolution=128, progress=False)
    errors = dict(result.errors)
    assert sorted(errors) == ids[:3] and sorted(result.written) == ids[3:]
    assert f"captions/{ids[0]}.json" in errors[ids[0]] and "utf-8" in errors[ids[0]]
    assert "1×1 is too small" in errors[ids[1]] and "20000×4 is too small" in errors[ids[2]]
    assert f"images/{ids[3]}.png: 640×128 has no bucket near its aspect ratio; the crop to 192×80 keeps 48%" \
        in caplog.text


def _children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except FileNotFoundError:
        return []


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie waits for its reaper, it runs nothing
    except FileNotFoundError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_dataloader_workers_die_with_a_sigkilled_trainer(tmp_path, toy_models, toy_prepared):
    args = fit_args(1, toy_models, toy_prepared, "--data.num_workers=2", "--trainer.max_steps=1000")
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "main.py"), *args], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not (tmp_path / "runs/checkpoints/stage1/step=0000001.ckpt").exists() and time.time() < deadline:
            time.sleep(0.2)
        workers = _children(proc.pid)
        assert len(workers) >= 2 and all(_alive(w) for w in workers)
        proc.kill()
        proc.wait()
        # at once: PyTorch's own watchdog in a worker only notices a dead parent every 5 s while idle
        deadline = time.time() + 2
        while any(_alive(w) for w in workers) and time.time() < deadline:
            time.sleep(0.05)
        assert not any(_alive(w) for w in workers)
    finally:
        if proc.poll() is None:
            proc.kill()
