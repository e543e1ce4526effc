"""What DataLoader worker processes do with the signals meant for the trainer."""

from __future__ import annotations

import ctypes
import signal
import sys

PR_SET_PDEATHSIG = 1


def worker_init(worker_id: int) -> None:
    """A worker ignores SIGTERM and SIGUSR1 (a scheduler signalling the whole process group means
    the trainer, which checkpoints and then shuts its workers down), and on Linux dies with its
    parent, so a SIGKILLed trainer leaves no orphaned workers."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
