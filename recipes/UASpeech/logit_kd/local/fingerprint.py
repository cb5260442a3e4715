"""The fingerprint of a run: every option that changes the trained model, and the identity of its
input data. Every checkpoint carries it (``checkpoints.RunFingerprint``); a run that finds
checkpoints in its output folder resumes (or, with ``--test_only``, tests) them only if their
fingerprint is its own. Otherwise ``cp -a out/base out/x`` followed by a run with
``--output_folder=out/x --temperature=1.0`` would test the old model under the new label.
"""

import hashlib
import json
from pathlib import Path

from local.checkpoints import FINGERPRINT
from local.options import CHECKS
from local.packed import file_signature

# Options that do not change the trained model: where things are written, how the run is
# executed, what else the test reports. (threads: float summation order only; the same model.)
# number_of_epochs is not here either: a run resumed with more epochs continues the same model,
# and check_epochs refuses a folder whose checkpoints went past the epochs asked for.
# Options added later, with the value that is what runs made before them did.
ADDED_LATER = {"max_train_items": None, "matched_items": "all"}
NOT_THE_MODEL = {
    "number_of_epochs",
    "output_folder",
    "save_folder",
    "train_log",
    "test_wer_file",
    "test_utterances_file",
    "test_results_file",
    "cache_folder",
    "num_workers",
    "ckpt_interval_minutes",
    "ctc_decode",
    "threads",
    "precompute_features",  # the same model either way, up to float rounding (tested)
    "device_resident",
    "demo_folder",
    "logit_root",  # replaced by the data's identity below
    "tokenizer_file",
    "models",  # the free-running decode after the test (local/decode_stage.py): not the trained model
    "speaker_csv",
    "data_root",
    "free_running",
    # Whether and which per-teacher-set choice applies: the options it sets are in the fingerprint
    # with their values, as any other.
    "matched_choice",
    "matched_choices",
}
# SpeechBrain run options that change the trained model (how it is optimised, in which precision,
# whether --debug cut its epochs short), with SpeechBrain 1.1.2's defaults.
MODEL_RUN_OPTIONS = {
    "precision": "fp32",
    "grad_accumulation_factor": 1,
    "skip_nonfinite_grads": False,
    "nonfinite_patience": 3,
    "remove_vector_weight_decay": False,
    "debug": False,
    "debug_batches": 2,
    "debug_epochs": 2,
}
VERSION = 2  # 2: run options, the inode change time of the files, early stopping in the counter


class FingerprintError(ValueError):
    """Checkpoints of another configuration in the output folder."""


def _plain(value):
    return (
        value if isinstance(value, (int, float, str, bool, type(None))) else json.loads(json.dumps(value, default=str))
    )


def option_fingerprint(hparams, teachers, run_opts=None):
    """The part of the fingerprint known before any input is read: the options that change the
    model (as loaded), the SpeechBrain run options among them, and the fold's teachers."""
    run_opts = dict(run_opts or {})
    options = {k: _plain(hparams[k]) for k in sorted(CHECKS) if k in hparams and k not in NOT_THE_MODEL}
    # Options added later enter the fingerprint only when set, so that folders made before them
    # (with their default) still resume and are still recognised as finished.
    for key, before in ADDED_LATER.items():
        if options.get(key, before) == before:
            options.pop(key, None)
    for key, default in MODEL_RUN_OPTIONS.items():
        value = hparams.get(key, run_opts.get(key))
        options[key] = _plain(default if value is None else value)
    options["teachers"] = list(teachers)
    return {"version": VERSION, "options": options}


def make_fingerprint(hparams, fold, run_opts=None):
    """The run's fingerprint: ``option_fingerprint`` and its data's identity (the logit root, the
    tokenizer's content, each logit and metadata file's size, mtime and inode change time: the
    key of the packed cache, so that a file rewritten with its size and mtime restored is new data
    for both)."""
    fingerprint = option_fingerprint(hparams, fold.info["teachers"], run_opts)
    files = {}
    root = Path(fold.info["logit_root"])
    for store in (fold.train_store, fold.test_store):
        for path in store.source_files():
            resolved = Path(path).resolve()
            key = str(resolved.relative_to(root)) if resolved.is_relative_to(root) else str(path)
            files[key] = file_signature(path)[1:]
    tokenizer = hashlib.sha256(Path(fold.info["tokenizer_file"]).read_bytes()).hexdigest()
    return {**fingerprint, "logit_root": str(root), "tokenizer_sha256": tokenizer, "files": files}


def read_fingerprints(save_folder):
    """{checkpoint folder name: fingerprint, or None when it has none} of the checkpoints of a
    save folder (the folders SpeechBrain would load: ``CKPT+*`` with a ``CKPT.yaml``)."""
    found = {}
    folder = Path(save_folder)
    if not folder.is_dir():
        return found
    for ckpt in sorted(folder.glob("CKPT+*")):
        if not (ckpt / "CKPT.yaml").is_file():
            continue
        path = ckpt / f"{FINGERPRINT}.ckpt"
        try:
            found[ckpt.name] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            found[ckpt.name] = None
    return found


def differences(old, new, limit=4):
    """Short descriptions of what differs between two fingerprints (``key: old -> new``); only the
    parts both hold are compared (``new`` may be the options part alone)."""
    out = []
    for key in sorted(set(old["options"]) | set(new["options"])):
        a, b = old["options"].get(key, "(unset)"), new["options"].get(key, "(unset)")
        if a != b:
            out.append(f"{key} {a} -> {b}")
    if "logit_root" in new and old["logit_root"] != new["logit_root"]:
        out.append(f"logit_root {old['logit_root']} -> {new['logit_root']}")
    if "tokenizer_sha256" in new and old["tokenizer_sha256"] != new["tokenizer_sha256"]:
        out.append("the tokenizer file's content")
    if "files" in new and old["logit_root"] == new["logit_root"]:
        changed = sorted(k for k in set(old["files"]) | set(new["files"]) if old["files"].get(k) != new["files"].get(k))
        if changed:
            out.append(f"logit files changed since: {', '.join(changed[:3])}" + (" ..." if len(changed) > 3 else ""))
    if len(out) > limit:
        out = out[:limit] + [f"and {len(out) - limit} more"]
    return out


def check_fingerprint(save_folder, fingerprint, chosen=None):
    """Raises FingerprintError (one line) if the save folder holds checkpoints made with another
    fingerprint (or with none, or an older one: an older version of the recipe). ``fingerprint``
    may be ``option_fingerprint`` alone (checked before the inputs are read) or the whole one.
    ``chosen``: the options the per-teacher-set choice gave this run, named when they differ (a
    folder made before the choice, or with ``--matched_choice=false``)."""
    for name, old in read_fingerprints(save_folder).items():
        if old is None:
            raise FingerprintError(
                f"{Path(save_folder) / name} has no readable fingerprint: it was made by an older version of "
                f"the recipe, or left incomplete by a run killed while it deleted this checkpoint; remove "
                f"that folder, or give another --output_folder"
            )
        if old.get("version") != VERSION:
            raise FingerprintError(
                f"{Path(save_folder) / name} was made by an older version of the recipe (its fingerprint "
                f"does not say everything this version checks): give another --output_folder"
            )
        if any(old.get(k) != v for k, v in fingerprint.items()):
            changed = [k for k in chosen or {} if old["options"].get(k) != fingerprint["options"].get(k)]
            hint = (
                f"; {', '.join(changed)} chosen per teacher set (matched_choices): --matched_choice=false "
                f"gives the options as written"
                if changed
                else ""
            )
            raise FingerprintError(
                f"{Path(save_folder).parent} holds checkpoints of another configuration "
                f"({'; '.join(differences(old, fingerprint)) or 'its fingerprint'}{hint}): give another "
                f"--output_folder, or remove {Path(save_folder)} to train this one there"
            )


def check_epochs(save_folder, epochs, number_of_epochs):
    """FingerprintError if a checkpoint went past ``number_of_epochs``: the model it holds (and
    the one the test would pick) is not the one a run of that many epochs trains."""
    if epochs and max(epochs.values()) > number_of_epochs:
        raise FingerprintError(
            f"{Path(save_folder).parent} holds checkpoints up to epoch {max(epochs.values())}, more than "
            f"--number_of_epochs={number_of_epochs}: its model is not the one of a {number_of_epochs}-epoch "
            f"run; give another --output_folder"
        )
