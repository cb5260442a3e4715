"""A run's output folder: usable, held by one run at a time, and left as it was when a run fails
before it starts.

- ``check_writable``: the folder (or the nearest existing folder above it) must be a writable
  folder, not a file.
- ``OutputLock``: the main process holds an exclusive lock on ``<output_folder>/.lock`` for the
  whole run; a second run started into the same folder stops with one line that names the
  process holding it. The kernel releases the lock when that process dies, so a killed run never
  leaves the folder locked.
- ``made_by_this_run`` / ``remove``: a run that fails its checks removes the output folder if it
  made it (loading the hparams creates the empty save folder; the lock file may follow).
"""

import datetime
import fcntl
import os
import shutil
import socket
from pathlib import Path

from local.distributed import RunError

LOCK_FILE = ".lock"


def check_writable(folder):
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise RunError(f"output folder {folder} is a file, not a folder: give another --output_folder")
    probe = folder
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise RunError(f"output folder {folder}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise RunError(f"output folder {folder} is not writable ({probe}): give another --output_folder")


class OutputLock:
    """The exclusive lock of an output folder (see the module docstring)."""

    def __init__(self, folder):
        self.path = Path(folder) / LOCK_FILE
        self.handle = None

    def acquire(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise RunError(
                f"output folder {self.path.parent} is in use by another run ({holder}): wait for it to end, "
                f"or give another --output_folder"
            ) from None
        handle.seek(0)
        handle.truncate()
        started = datetime.datetime.now().isoformat(timespec="seconds")
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}, since {started}\n")
        handle.flush()
        self.handle = handle
        return self

    def release(self):
        if self.handle is not None:
            self.handle.close()
            self.handle = None


def made_by_this_run(output_folder, save_folder):
    """True when the output folder holds nothing but what loading the hparams and taking the lock
    made (an empty save folder, the lock file): the run that failed made it."""
    out, save = Path(output_folder), Path(save_folder)
    if not out.is_dir():
        return False
    allowed = {save, out / LOCK_FILE}
    return all(p in allowed for p in out.iterdir()) and (not save.is_dir() or not any(save.iterdir()))


def remove(output_folder):
    """Removes a folder this run made, and the parents it made, as long as they are empty."""
    out = Path(output_folder)
    shutil.rmtree(out, ignore_errors=True)
    try:
        os.removedirs(out.parent)
    except OSError:
        pass
