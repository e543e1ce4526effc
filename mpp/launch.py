"""`mpp launch [torchrun options] main.py fit ...`: torchrun, exiting with the status mpp means.

torchrun exits 1 whenever a worker ends with a non-zero status or it is signalled itself: a
scheduler's SIGTERM makes it forward the signal, the workers save `preempted.ckpt` and stop, and
torchrun still exits 1 with a `SignalException` traceback, so a retry policy sees a failure. Here
torchrun runs in this process with `MPP_EXIT_FILE` naming a file where rank 0 of the run writes the
status it ends with (`mpp.__main__.run_command`: 0 done, 75 preempted and saved, 2 user error), and
the launcher exits with that status; without one (a crash, a worker killed), with torchrun's own.

    mpp launch --standalone --nproc_per_node 8 main.py fit --config configs/stage1.yaml
"""

from __future__ import annotations

import logging
import os
import tempfile

EXIT_FILE_ENV = "MPP_EXIT_FILE"

log = logging.getLogger(__name__)


def write_exit_status(code: int) -> None:
    """Rank 0 of a launched run records the status it ends with (nothing outside `mpp launch`)."""
    path = os.environ.get(EXIT_FILE_ENV)
    if path and os.environ.get("RANK", "0") == "0":
        with open(path, "w") as f:
            f.write(str(int(code)))


def main(argv: list[str] | None = None) -> int:
    import torch.distributed.run as torchrun  # torch.distributed's launcher: loaded only to launch

    fd, path = tempfile.mkstemp(prefix="mpp-exit-")
    os.close(fd)
    os.unlink(path)
    os.environ[EXIT_FILE_ENV] = path
    code = 0
    try:
        torchrun.main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except Exception as e:  # SignalException, ChildFailedError: torchrun's ways to say "not 0"
        log.warning("torchrun stopped: %s", str(e).splitlines()[0] if str(e) else type(e).__name__)
        code = 1
    try:
        with open(path) as f:
            recorded = int(f.read().strip())
    except (OSError, ValueError):
        return code
    finally:
        if os.path.exists(path):
            os.unlink(path)
    if recorded != code:
        log.info("the run's rank 0 ended with status %d (torchrun's: %d)", recorded, code)
    return recorded
