"""One run per checkpoint folder: a lock file each process of a fit holds while it trains.

Two fits on one folder would rotate each other's checkpoints away and share a log folder. Each rank
creates `.lock-rank<R>` in the stage's checkpoint folder (one per rank, so a second run's every rank
is refused alike and none waits for a peer that gave up) holding its host, PID and start time, and
touches it every HEARTBEAT_S seconds. A lock is stale, and taken over with a warning, when its
process is gone on this host or, held on another host, when it has not been touched for STALE_S
seconds (a preempted job requeued elsewhere). Otherwise the run is refused, naming the holder.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time

log = logging.getLogger(__name__)

HEARTBEAT_S = 30.0
STALE_S = 300.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """`with RunLock(folder, rank):` holds the folder's lock of `rank` for the block."""

    def __init__(self, folder: str, rank: int = 0):
        self.path = os.path.join(folder, f".lock-rank{rank}")
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def _holder(self) -> dict | None:
        try:
            with open(self.path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def _stale(self, holder: dict | None) -> bool:
        if holder is None:
            return True  # half-written or unreadable: a holder never leaves it so for long
        if holder.get("host") == socket.gethostname():
            return not _alive(int(holder.get("pid", -1)))
        try:
            return time.time() - os.path.getmtime(self.path) > STALE_S
        except OSError:
            return True

    def __enter__(self) -> RunLock:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if not self._stale(holder):
                    raise ValueError(f"{os.path.dirname(self.path)} is in use by another run (PID {holder['pid']} on "
                                     f"{holder['host']}, since {holder.get('started')}): wait for it, stop it, or "
                                     f"give this run other folders; if that run is gone, delete {self.path}") from None
                log.warning("taking over %s from a run that is gone (%s)", self.path, holder)
                os.unlink(self.path)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            break
        self._beat = threading.Thread(target=self._heartbeat, name="mpp-run-lock", daemon=True)
        self._beat.start()
        return self

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                return

    def __exit__(self, *exc) -> None:
        self._stop.set()
        try:
            os.unlink(self.path)
        except OSError:
            pass
