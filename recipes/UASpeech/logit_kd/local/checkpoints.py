"""A SpeechBrain Checkpointer whose checkpoints become visible only once complete, on which every
process agrees, and which carry the fingerprint of the run that made them.

- SpeechBrain 1.1.2 writes ``CKPT.yaml`` (the file that makes a folder a checkpoint) *before* the
  parameter files. A run killed in between leaves a folder that ``recover_if_possible`` would pick
  as the most recent checkpoint and then fail to load. Here the meta file is written under a
  temporary name and renamed once every parameter file is saved; folders left behind by an
  interrupted save have no ``CKPT.yaml``, are ignored by SpeechBrain, and are removed at the next save.
- Under DDP, deleting a checkpoint is a collective operation (SpeechBrain's ``_delete_checkpoint``
  runs on the main process and broadcasts), so every process must delete the same checkpoints. A
  process that lists the folder while the main process is still renaming a new checkpoint's meta
  file sees one checkpoint fewer, and the processes then wait for each other for ever. Here the
  main process lists the folder and the others take its list.
- A save on a full disk is reported as such (``files.DiskFullError``), naming the checkpoint.
- ``RunFingerprint``: everything that changes the trained model or its data, saved in every
  checkpoint, so that a run never resumes (or tests) a checkpoint made with other settings.
"""

import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from speechbrain.utils.checkpoints import (
    CKPT_PREFIX,
    METAFNAME,
    Checkpointer,
    mark_as_loader,
    mark_as_saver,
    register_checkpoint_hooks,
)
from speechbrain.utils.distributed import ddp_broadcast, if_main_process

from local.files import DiskFullError, atomic_write, is_disk_full, write_json

PARTIAL = METAFNAME + ".partial"


class CompleteCheckpointer(Checkpointer):
    """``Checkpointer`` with an atomic save (see the module docstring)."""

    def _save_checkpoint_metafile(self, fpath, meta_to_include={}, end_of_epoch=True):
        return super()._save_checkpoint_metafile(fpath.with_name(PARTIAL), meta_to_include, end_of_epoch)

    def save_checkpoint(self, meta={}, end_of_epoch=True, name=None, verbosity=logging.INFO):
        if if_main_process():
            self._remove_interrupted_saves()
        try:
            checkpoint = super().save_checkpoint(meta=meta, end_of_epoch=end_of_epoch, name=name, verbosity=verbosity)
        except (OSError, RuntimeError) as err:
            if is_disk_full(err):
                if if_main_process():
                    self._remove_interrupted_saves()
                raise DiskFullError(self.checkpoints_dir, "while saving a checkpoint") from None
            raise
        if checkpoint is not None:  # the main process: every parameter file is on disk now
            os.replace(checkpoint.path / PARTIAL, checkpoint.path / METAFNAME)
        return checkpoint

    def list_checkpoints(self):
        # Every process must see the same checkpoints (see the module docstring): the main process
        # lists the folder, the others take its list.
        checkpoints = super().list_checkpoints() if if_main_process() else None
        return ddp_broadcast(checkpoints, src=0)

    def _remove_interrupted_saves(self):
        if not self.checkpoints_dir.is_dir():
            return
        for path in self.checkpoints_dir.iterdir():
            if path.is_dir() and path.name.startswith(CKPT_PREFIX) and not (path / METAFNAME).exists():
                shutil.rmtree(path, ignore_errors=True)


@register_checkpoint_hooks
class LogFileState:
    """Makes a log file (``train_log.txt``) part of every checkpoint.

    The epoch's line is written before its checkpoint; a run killed in between resumes from an
    earlier checkpoint and would write that line a second time. Restoring the file as it was when
    the checkpoint was saved keeps it identical to the log of an uninterrupted run.
    """

    def __init__(self, path):
        self.path = Path(path)
        self.restore = True

    @contextmanager
    def kept(self):
        """Loading a checkpoint inside this block leaves the file alone (loading the best
        checkpoint for the test must not rewind the log to that epoch)."""
        self.restore = False
        try:
            yield
        finally:
            self.restore = True

    @mark_as_saver
    def save(self, path):
        text = self.path.read_text(encoding="utf-8") if self.path.is_file() else ""
        Path(path).write_text(text, encoding="utf-8")

    @mark_as_loader
    def load(self, path, end_of_epoch=True, device=None):
        del end_of_epoch, device
        if self.restore and if_main_process():
            saved = Path(path).read_text(encoding="utf-8")
            atomic_write(self.path, lambda handle: handle.write(saved))


FINGERPRINT = "fingerprint"  # the recoverable's name: CKPT+*/fingerprint.ckpt


@register_checkpoint_hooks
class RunFingerprint:
    """What a checkpoint was made with: the options that change the trained model and the identity
    of its input data (``fingerprint.make_fingerprint``). Saved in every checkpoint; loading does
    nothing, since runs compare the fingerprints of a folder before they start
    (``fingerprint.check_fingerprint``)."""

    def __init__(self, fingerprint):
        self.fingerprint = fingerprint

    @mark_as_saver
    def save(self, path):
        write_json(path, self.fingerprint)

    @mark_as_loader
    def load(self, path, end_of_epoch=True, device=None):
        del path, end_of_epoch, device
