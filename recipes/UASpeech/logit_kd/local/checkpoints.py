"""A SpeechBrain Checkpointer whose checkpoints become visible only once complete.

SpeechBrain 1.1.2 writes ``CKPT.yaml`` (the file that makes a folder a checkpoint) *before* the
parameter files. A run killed in between leaves a folder that ``recover_if_possible`` would pick as
the most recent checkpoint and then fail to load. Here the meta file is written under a temporary
name and renamed once every parameter file is saved; folders left behind by an interrupted save
have no ``CKPT.yaml``, are ignored by SpeechBrain, and are removed at the next save.
"""

import logging
import os
import shutil

from speechbrain.utils.checkpoints import CKPT_PREFIX, METAFNAME, Checkpointer
from speechbrain.utils.distributed import if_main_process

PARTIAL = METAFNAME + ".partial"


class CompleteCheckpointer(Checkpointer):
    """``Checkpointer`` with an atomic save (see the module docstring)."""

    def _save_checkpoint_metafile(self, fpath, meta_to_include={}, end_of_epoch=True):
        return super()._save_checkpoint_metafile(fpath.with_name(PARTIAL), meta_to_include, end_of_epoch)

    def save_checkpoint(self, meta={}, end_of_epoch=True, name=None, verbosity=logging.INFO):
        if if_main_process():
            self._remove_interrupted_saves()
        checkpoint = super().save_checkpoint(meta=meta, end_of_epoch=end_of_epoch, name=name, verbosity=verbosity)
        if checkpoint is not None:  # the main process: every parameter file is on disk now
            os.replace(checkpoint.path / PARTIAL, checkpoint.path / METAFNAME)
        return checkpoint

    def _remove_interrupted_saves(self):
        if not self.checkpoints_dir.is_dir():
            return
        for path in self.checkpoints_dir.iterdir():
            if path.is_dir() and path.name.startswith(CKPT_PREFIX) and not (path / METAFNAME).exists():
                shutil.rmtree(path, ignore_errors=True)
