"""What a logit tree, a run or a ``wer_*.txt`` file was computed on: one of three kinds that are
never put side by side in one comparison.

- ``real``: logits of the user's SA models on UASpeech recordings;
- ``demo``: the embedded demo tree, logits drawn by a generator (a ``SYNTHETIC.json`` beside the
  tree): the figures only show that the recipe runs;
- ``rehearsal``: the rehearsal corpus (``make_rehearsal.py``, a ``REHEARSAL.json`` at its root):
  SYNTHETIC speech from Debian's synthesizers, but real SpeechBrain models trained on it, so real
  confusions and real (mis)calibration. Not UASpeech either.

Runs written before this module existed only say ``synthetic_data`` (true for the demo tree).
"""

import json
from pathlib import Path

REAL, DEMO, REHEARSAL = "real", "demo", "rehearsal"
DEMO_MARKER = "SYNTHETIC.json"
REHEARSAL_MARKER = "REHEARSAL.json"

LABELS = {
    REAL: "real logits",
    DEMO: "SYNTHETIC demo tree (logits drawn by a generator)",
    REHEARSAL: "rehearsal corpus: SYNTHETIC speech, real models (not UASpeech)",
}


def of_folder(folder):
    """The kind of everything under ``folder`` (a logit root, a cross-testing folder, a file):
    the first marker found in it or a folder above it; ``real`` when there is none."""
    folder = Path(folder).resolve()
    for parent in (folder, *folder.parents):
        if (parent / DEMO_MARKER).is_file():
            return DEMO
        if (parent / REHEARSAL_MARKER).is_file():
            return REHEARSAL
    return REAL


def of_info(info):
    """The kind recorded in a run's ``test_results.json`` (older runs: from ``synthetic_data``)."""
    kind = info.get("data_kind")
    if kind in LABELS:
        return kind
    return DEMO if info.get("synthetic_data") else REAL


def write_rehearsal_marker(corpus, record):
    """Marks a rehearsal corpus's root so every job that reads from it labels its figures."""
    path = Path(corpus) / REHEARSAL_MARKER
    text = json.dumps({"kind": REHEARSAL, "label": LABELS[REHEARSAL], **record}, indent=2) + "\n"
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    return path
