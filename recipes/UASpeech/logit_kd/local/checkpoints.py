"""A SpeechBrain Checkpointer whose checkpoints become visible only once complete, on which every
process agrees, and which carry the fingerprint of the run that made them.

- SpeechBrain 1.1.2 writes ``CKPT.yaml`` (the file that makes a folder a checkpoint) *before* the
  parameter files. A run killed in between leaves a folder that ``recover_if_possible`` would pick
  as the most recent checkpoint and then fail to load. Here the meta file is written under a
  temporary name and renamed once every parameter file is saved; folders left behind by an
  interrupted save have no ``CKPT.yaml``, are ignored by SpeechBrain, and are removed at the next save.
  Deleting works the other way round: ``CKPT.yaml`` goes first, then the folder. SpeechBrain 1.1.2
  removes the folder file by file (``shutil.rmtree``, in directory order), so a run killed while it
  deleted an old checkpoint left a folder that still looked like a checkpoint but lacked some of its
  files (its fingerprint, say), which the next run then refused or failed to load.
- Under DDP, deleting a checkpoint is a collective operation (SpeechBrain's ``_delete_checkpoint``
  runs on the main process and broadcasts), so every process must delete the same checkpoints. A
  process that lists the folder while the main process is still renaming a new checkpoint's meta
  file sees one checkpoint fewer, and the processes then wait for each other for ever. Here the
  main process lists the folder and the others take its list.
- A save on a full disk is reported as such (``files.DiskFullError``), naming the checkpoint.
- ``RunFingerprint``: everything that changes the trained model or its data, saved in every
  checkpoint, so that a run never resumes (or tests) a checkpoint made with other settings.
- ``StoppingEpochCounter``: SpeechBrain's early-stopping epoch counter, with its whole state in
  the checkpoint (SpeechBrain 1.1.2 saves only the epoch number of it, see the class).
- ``check_checkpoints``: every checkpoint a run could load is read before the run writes
  anything, so that a corrupt file stops it with one line, not halfway with a traceback.
"""

import json
import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
import yaml
from speechbrain.utils.checkpoints import (
    CKPT_PREFIX,
    METAFNAME,
    Checkpointer,
    mark_as_loader,
    mark_as_saver,
    register_checkpoint_hooks,
)
from speechbrain.utils.distributed import ddp_broadcast, if_main_process, main_process_only
from speechbrain.utils.epoch_loop import EpochCounterWithStopper

from local.files import DiskFullError, atomic_write, is_disk_full, write_json

PARTIAL = METAFNAME + ".partial"
logger = logging.getLogger(__name__)


@main_process_only
def _delete_meta_first(checkpoint, verbosity=logging.INFO):
    """SpeechBrain's ``Checkpointer._delete_checkpoint``, with the meta file removed first: a run
    killed halfway leaves a folder without ``CKPT.yaml`` (an interrupted save, see the module
    docstring), never one that looks complete."""
    if not Checkpointer._is_checkpoint_dir(checkpoint.path):
        raise RuntimeError("Checkpoint does not appear valid for deletion.")
    os.remove(Path(checkpoint.path) / METAFNAME)
    shutil.rmtree(checkpoint.path)
    logger.log(verbosity, f"Deleted checkpoint in {checkpoint.path}")


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

    def delete_checkpoints(self, **kwargs):
        # SpeechBrain 1.1.2 calls the deletion as ``Checkpointer._delete_checkpoint(...)``, on the
        # base class, so a subclass cannot override it: it is swapped for this call only (one
        # thread saves and deletes checkpoints in a run).
        original = Checkpointer.__dict__["_delete_checkpoint"]
        Checkpointer._delete_checkpoint = staticmethod(_delete_meta_first)
        try:
            return super().delete_checkpoints(**kwargs)
        finally:
            Checkpointer._delete_checkpoint = original

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


@register_checkpoint_hooks
class StoppingEpochCounter(EpochCounterWithStopper):
    """``EpochCounterWithStopper`` whose checkpoint holds its early-stopping state.

    SpeechBrain 1.1.2 gives ``EpochCounterWithStopper`` a saver and a loader for its state (the
    best epoch and score, whether to stop) but does not register them (its class lacks
    ``register_checkpoint_hooks``), so the Checkpointer falls back on ``EpochCounter``'s hooks and
    saves the epoch number alone. A run killed and resumed then starts early stopping afresh: a
    fold that stops at epoch 15 uninterrupted trained on to epoch 20 once resumed. Here the
    state is saved as a small yaml mapping; a checkpoint that holds the bare epoch number (made
    before this class) cannot resume training (``check_checkpoints`` says so) but can be tested.
    """

    @mark_as_saver
    def save(self, path):
        state = {
            "current_epoch": self.current,
            "best_epoch": self.best_limit,
            "best_score": float(self.best_score),
            "should_stop": bool(self.should_stop),
        }
        Path(path).write_text(yaml.safe_dump(state), encoding="utf-8")

    @mark_as_loader
    def load(self, path, end_of_epoch=True, device=None):
        del device
        state = read_counter(path)
        if not isinstance(state, dict):  # the epoch number alone (see the class docstring)
            self.current = state if end_of_epoch else state - 1
            return
        self.current = state["current_epoch"] if end_of_epoch else state["current_epoch"] - 1
        self.best_limit = state["best_epoch"]
        self.best_score = state["best_score"]
        self.should_stop = state["should_stop"]


class CheckpointError(ValueError):
    """A checkpoint a run would load is unreadable, or cannot resume this run: one line."""


def read_counter(path):
    """The epoch counter file of a checkpoint: a dict (``StoppingEpochCounter``) or an int (the
    epoch number alone); CheckpointError otherwise."""
    try:
        state = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise CheckpointError(f"checkpoint file {path} is unreadable ({type(err).__name__})") from None
    keys = {"current_epoch": int, "best_epoch": int, "best_score": float, "should_stop": bool}
    if isinstance(state, dict):
        ok = set(state) == set(keys) and all(
            isinstance(state[k], t) or (t is float and isinstance(state[k], int)) for k, t in keys.items()
        )
    else:
        ok = isinstance(state, int) and not isinstance(state, bool)
    if not ok:
        raise CheckpointError(f"checkpoint file {path} is not an epoch counter (corrupt?)")
    return state


def checkpoint_epoch(ckpt_dir):
    """The epoch a checkpoint folder was saved in (its counter file)."""
    state = read_counter(Path(ckpt_dir) / "counter.ckpt")
    return state["current_epoch"] if isinstance(state, dict) else state


def _read_torch(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure to read is one line naming the file
        raise CheckpointError(f"checkpoint file {path} is unreadable ({type(err).__name__})") from None


def _read_yaml_mapping(path, keys=()):
    try:
        data = yaml.safe_load(_read_text(path))
    except yaml.YAMLError as err:
        raise CheckpointError(f"checkpoint file {path} is unreadable ({type(err).__name__})") from None
    if not isinstance(data, dict) or any(k not in data for k in keys):
        raise CheckpointError(f"checkpoint file {path} lacks {list(keys)} (corrupt?)")
    return data


def check_checkpoints(save_folder, modules, expected=(), resume=True):
    """Reads every file of every complete checkpoint in ``save_folder`` as a run would load it
    and raises CheckpointError naming the first one that would fail: ``modules`` (name ->
    ``torch.nn.Module``) must fit their state dicts, ``expected`` files must be there. With
    ``resume`` (training would go on from the most recent checkpoint), a counter without the
    early-stopping state is refused too. Returns {checkpoint folder name: its epoch}."""
    folder = Path(save_folder)
    epochs = {}
    if not folder.is_dir():
        return epochs
    for ckpt in sorted(p for p in folder.glob(CKPT_PREFIX + "*") if (p / METAFNAME).is_file()):
        _read_yaml_mapping(ckpt / METAFNAME, keys=("end-of-epoch",))
        missing = [n for n in (*modules, *expected) if not (ckpt / f"{n}.ckpt").is_file()]
        if missing:
            raise CheckpointError(f"checkpoint {ckpt} lacks {missing[0]}.ckpt: it cannot be loaded")
        for path in sorted(ckpt.glob("*.ckpt")):
            name = path.stem
            if name in modules:
                state = _read_torch(path)
                try:
                    _same_shapes(modules[name], state)
                except ValueError as err:
                    raise CheckpointError(f"checkpoint file {path} does not fit the {name}: {err}") from None
            elif name == "counter":
                state = read_counter(path)
                epochs[ckpt.name] = state["current_epoch"] if isinstance(state, dict) else state
                if resume and not isinstance(state, dict):
                    raise CheckpointError(
                        f"{ckpt} was saved by an older version of the recipe, without the early-stopping "
                        f"state (SpeechBrain 1.1.2 drops it): training cannot resume from it exactly; "
                        f"--test_only still tests it, or give another --output_folder"
                    )
            elif name == "brain":
                _read_yaml_mapping(path, keys=("step", "optimizer_step"))
            elif name.startswith("dataloader-"):
                if not _read_text(path).strip().isdigit():
                    raise CheckpointError(f"checkpoint file {path} is not a step number (corrupt?)")
            elif name == FINGERPRINT:
                try:
                    json.loads(_read_text(path))
                except ValueError:
                    raise CheckpointError(f"checkpoint file {path} is not JSON (corrupt?)") from None
            elif name == "train_log":
                _read_text(path)
            else:  # the optimiser, the scheduler, ...: torch files
                _read_torch(path)
    return epochs


def _read_text(path):
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"checkpoint file {path} is unreadable ({type(err).__name__})") from None


def _same_shapes(module, state):
    """ValueError unless ``state`` is a state dict of ``module`` (same keys, same shapes)."""
    if not isinstance(state, dict):
        raise ValueError("not a state dict")
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"missing keys {missing[:3]}, unexpected keys {unexpected[:3]}")
    for key, value in own.items():
        if not isinstance(state[key], torch.Tensor) or state[key].shape != value.shape:
            raise ValueError(f"{key} has another shape")
