"""mpp.data.workers: what a DataLoader worker does with signals, how it hands batches over, and
that a killed trainer leaves neither workers nor shared memory behind."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch.utils.data import DataLoader

from mpp.data.dataset import pack, unpack
from mpp.data.workers import worker_init


def _in_worker(_):
    return {"strategy": torch.multiprocessing.get_sharing_strategy(),
            "sigterm_ignored": signal.getsignal(signal.SIGTERM) == signal.SIG_IGN,
            "batch": pack({"x": torch.arange(6, dtype=torch.float32).view(2, 3)})}


def test_workers_ignore_sigterm_and_hand_batches_over_by_file_name_leaving_the_trainer_as_it_was():
    before = torch.multiprocessing.get_sharing_strategy()
    loader = DataLoader([0, 1], batch_size=1, num_workers=1, collate_fn=_in_worker, worker_init_fn=worker_init)
    got = list(loader)
    assert [g["strategy"] for g in got] == ["file_system", "file_system"]
    assert all(g["sigterm_ignored"] for g in got)
    assert torch.equal(unpack(got[0]["batch"])["x"], torch.arange(6, dtype=torch.float32).view(2, 3))
    assert torch.multiprocessing.get_sharing_strategy() == before
    assert signal.getsignal(signal.SIGTERM) != signal.SIG_IGN


KILLED_TRAINER = """
import os, time
import torch
from torch.utils.data import DataLoader
from mpp.data.dataset import pack, unpack
from mpp.data.workers import worker_init

def collate(items):
    return pack({"pid": torch.tensor([os.getpid()]), "x": torch.zeros(4096)})

if __name__ == "__main__":
    loader = DataLoader(range(10**6), batch_size=1, num_workers=2, collate_fn=collate,
                        worker_init_fn=worker_init, persistent_workers=True)
    it = iter(loader)
    held = [unpack(next(it)) for _ in range(4)]
    print(*sorted({int(b["pid"]) for b in held}), flush=True)
    time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /dev/shm are Linux's")
def test_a_sigkilled_trainer_leaves_no_workers_and_no_shared_memory(tmp_path):
    script = tmp_path / "trainer.py"
    script.write_text(KILLED_TRAINER)
    trainer = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        workers = [int(p) for p in trainer.stdout.readline().split()]
        assert len(workers) == 2 and all(_alive(p) for p in workers)
        files = [f for f in os.listdir("/dev/shm") if any(f.startswith(f"torch_{p}_") for p in workers)]
        assert files, "the workers' batches should sit in /dev/shm under their names"
    finally:
        trainer.kill()
        trainer.wait()
    deadline = time.monotonic() + 3  # torch's own watchdog in a worker would take up to 5 s
    while time.monotonic() < deadline and (any(map(_alive, workers)) or
                                           any(os.path.exists(f"/dev/shm/{f}") for f in files)):
        time.sleep(0.1)
    assert not [p for p in workers if _alive(p)]
    assert not [f for f in files if os.path.exists(f"/dev/shm/{f}")]
