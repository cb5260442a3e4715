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

# Options that do not change the trained model: where things are written, how the run is
# executed, what else the test reports, and how long training may go on (a run resumed with more
# epochs continues the same model). (threads: float summation order only; the same model.)
NOT_THE_MODEL = {
    "number_of_epochs",
    "early_stop_patience",
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
}


class FingerprintError(ValueError):
    """Checkpoints of another configuration in the output folder."""


def _plain(value):
    return (
        value if isinstance(value, (int, float, str, bool, type(None))) else json.loads(json.dumps(value, default=str))
    )


def make_fingerprint(hparams, fold):
    """The run's fingerprint: its model options (as loaded), its fold and its data's identity
    (the logit root, the tokenizer's content, each logit and metadata file's size and mtime)."""
    options = {k: _plain(hparams[k]) for k in sorted(CHECKS) if k in hparams and k not in NOT_THE_MODEL}
    options["teachers"] = list(fold.info["teachers"])
    files = {}
    root = Path(fold.info["logit_root"])
    for store in (fold.train_store, fold.test_store):
        for path in store.source_files():
            st = Path(path).stat()
            key = (
                str(Path(path).resolve().relative_to(root)) if Path(path).resolve().is_relative_to(root) else str(path)
            )
            files[key] = [st.st_size, st.st_mtime_ns]
    tokenizer = hashlib.sha256(Path(fold.info["tokenizer_file"]).read_bytes()).hexdigest()
    return {"options": options, "logit_root": str(root), "tokenizer_sha256": tokenizer, "files": files}


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
    """Short descriptions of what differs between two fingerprints (``key: old -> new``)."""
    out = []
    for key in sorted(set(old["options"]) | set(new["options"])):
        a, b = old["options"].get(key, "(unset)"), new["options"].get(key, "(unset)")
        if a != b:
            out.append(f"{key} {a} -> {b}")
    if old["logit_root"] != new["logit_root"]:
        out.append(f"logit_root {old['logit_root']} -> {new['logit_root']}")
    if old["tokenizer_sha256"] != new["tokenizer_sha256"]:
        out.append("the tokenizer file's content")
    changed = sorted(k for k in set(old["files"]) | set(new["files"]) if old["files"].get(k) != new["files"].get(k))
    if changed and old["logit_root"] == new["logit_root"]:
        out.append(f"logit files changed since: {', '.join(changed[:3])}" + (" ..." if len(changed) > 3 else ""))
    if len(out) > limit:
        out = out[:limit] + [f"and {len(out) - limit} more"]
    return out


def check_fingerprint(save_folder, fingerprint):
    """Raises FingerprintError (one line) if the save folder holds checkpoints made with another
    fingerprint (or with none: an older version of the recipe)."""
    for name, old in read_fingerprints(save_folder).items():
        if old is None:
            raise FingerprintError(
                f"{Path(save_folder) / name} has no fingerprint (made by an older version of the recipe): "
                f"cannot tell what it was trained with; give another --output_folder"
            )
        if old != fingerprint:
            raise FingerprintError(
                f"{Path(save_folder).parent} holds checkpoints of another configuration "
                f"({'; '.join(differences(old, fingerprint))}): give another --output_folder, or remove "
                f"{Path(save_folder)} to train this one there"
            )
