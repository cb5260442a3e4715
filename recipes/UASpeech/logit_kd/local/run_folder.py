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
- ``write_hyperparams`` and ``LOG_CONFIG``: what train.py gives SpeechBrain's
  ``create_experiment_directory`` so that a full disk on a rerun into a finished folder neither
  truncates its ``hyperparams.yaml`` (written atomically) nor cuts ``log.txt`` mid-line
  (``WholeLineFileHandler`` writes whole lines).
"""

import datetime
import fcntl
import logging
import os
import shutil
import socket
from pathlib import Path

from local.distributed import RunError, stop
from local.files import DiskFullError, atomic_write, is_disk_full

LOCK_FILE = ".lock"


def check_writable(folder, what="output folder", option="output_folder"):
    """RunError (one line) unless ``folder`` is, or can be made as, a writable folder."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise RunError(f"{what} {folder} is a file, not a folder: give another --{option}")
    probe = folder
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise RunError(f"{what} {folder}: {probe} is a file, not a folder: give another --{option}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise RunError(f"{what} {folder} is not writable ({probe}): give another --{option}")


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


LOG_CONFIG = Path(__file__).with_name("log_config.yaml")


class WholeLineFileHandler(logging.FileHandler):
    """A log file handler that appends each record as one whole line (one ``os.write`` of its
    bytes, retried until all are written). If the disk is full, the file is cut back to its last
    whole line and the run stops with ``ERROR: no space left on device: <log file>`` (exit
    status 1), rather than a traceback for this record and every later one."""

    def emit(self, record):
        try:
            if self.stream is None:
                self.stream = self._open()
            data = (self.format(record) + self.terminator).encode(self.encoding or "utf-8")
            self.stream.flush()
            fd = self.stream.fileno()
            start = os.lseek(fd, 0, os.SEEK_END)
            try:
                done = 0
                while done < len(data):
                    done += os.write(fd, data[done:])
            except OSError:
                os.ftruncate(fd, start)
                raise
        except OSError as err:
            if is_disk_full(err):
                self.close()
                logging.getLogger().removeHandler(self)
                stop(str(DiskFullError(self.baseFilename, "while writing the log")))
            self.handleError(record)


def write_hyperparams(folder, hyperparams_to_save, overrides):
    """``hyperparams.yaml`` as SpeechBrain's ``create_experiment_directory`` writes it (the base
    file with its references resolved under a three-line header), but atomically: SpeechBrain
    truncates the file first, so a failed write (a full disk) would lose a finished run's copy.
    Main process only; train.py then calls SpeechBrain's function without ``hyperparams_to_save``."""
    from hyperpyyaml import resolve_references
    from speechbrain.utils.distributed import if_main_process

    if not if_main_process():
        return
    with open(hyperparams_to_save, encoding="utf-8") as handle:
        resolved = resolve_references(handle, overrides).getvalue()
    header = (
        f"# Generated {datetime.date.today()} from:\n# {os.path.abspath(hyperparams_to_save)}\n# yamllint disable\n"
    )
    atomic_write(Path(folder) / "hyperparams.yaml", lambda handle: handle.write(header + resolved))
