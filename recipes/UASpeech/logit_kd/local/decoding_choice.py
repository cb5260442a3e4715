"""The decoding of each system, chosen on the teacher speakers' validation audio (tune_decoding.py),
and read back by ``decode.py --search chosen``.

Why: the SA pipeline's beam settings (CTC 0.4, LM 0.6 in its yaml) were tuned for its own models.
A student that fuses several models' step logits, or models other than the user's, may be served
best by other weights, and so may the untrained combinations it is compared with. Choosing them on
the held-out speaker would be choosing on the test; here every system gets the decoding that is best
on the fold's validation productions of the teacher speakers (the same productions train.py
validates on), decoded free-running from their audio exactly as the test is:

- ``cross``: speaker X's validation utterances read by the fold's teacher models other than X's own
  (X has no model at test time either), the student fusing them, their ``mean``, each alone and
  their ``majority_vote``;
- ``matched`` / ``self``: teacher speaker X's validation utterances read by X's own model, the
  student on that one stream and the model alone (what ``sa_self`` is on the test).

The candidates are the greedy search and the beam search at each pair of CTC and LM weights of a
grid (the other settings those of the SA hparams file, or the options). Each *kind* of system gets
the candidate with the highest WRA on that audio: the student; ``mean``; the single SA models
(every teacher alone, ``sa_self`` and, through them, the vote) chosen by the vote's WRA with
``cross`` (the vote is the figure the student is held against; its models are searched one way)
and by the model alone's WRA with ``matched``. Ties go to the candidate listed first: the SA
setting, then greedy, then the grid in ascending weights.
"""

import json
from collections import defaultdict
from pathlib import Path

from local.corpus import production_of
from local.files import write_json

CHOICE_FILE = "decoding_choice.json"
VERSION = 1
# system name -> the kind that gets one choice
KINDS_CROSS = ("student", "mean", "single")
KINDS_MATCHED = ("student", "single")


class ChoiceError(ValueError):
    """A missing or unusable choice file; the message names it."""


def kind_of(system):
    """The kind of a system of decode.py: ``student``, ``mean`` or ``single`` (an SA model alone:
    ``teacher_<M>``, ``sa_self``); the vote is made of the single models' hypotheses."""
    if system in ("student", "mean"):
        return system
    if system == "sa_self" or system.startswith("teacher_"):
        return "single"
    raise ValueError(f"no decoding is chosen for system {system!r}")


def candidate_name(search, ctc_weight=None, lm_weight=None):
    if search == "greedy":
        return "greedy"
    return f"beam_ctc{ctc_weight:g}_lm{lm_weight:g}"


def candidates(settings, ctc_weights, lm_weights):
    """[(name, search, settings)] in the order ties are broken: the SA setting (``settings``),
    greedy, then the grid (CTC weight, then LM weight, ascending)."""
    out, seen = [], set()

    def add(search, ctc=None, lm=None):
        name = candidate_name(search, ctc, lm)
        if name in seen:
            return
        seen.add(name)
        these = dict(settings)
        if search == "beam":
            these.update(ctc_weight=float(ctc), lm_weight=float(lm))
        out.append((name, search, these))

    add("beam", settings["ctc_weight"], settings["lm_weight"])
    add("greedy")
    for ctc in sorted(set(ctc_weights)):
        for lm in sorted(set(lm_weights)):
            add("beam", ctc, lm)
    return out


def choose(wra, order):
    """The candidate with the highest WRA (``wra``: name -> WRA); ties: the first in ``order``."""
    best = max(wra[name] for name in order)
    return next(name for name in order if wra[name] == best)


def _productions(ids):
    return {production_of(u) for u in ids}


def validation_utterances(store_ids, valid_fraction, seed):
    """{speaker: [utterance ids]} of the validation productions, as train.py draws them
    (``folds.validation_groups``), from ``store_ids`` ({speaker: utterance ids of the training
    audio}: the fold's train store lists exactly these)."""
    from local.folds import validation_groups

    class _Ids:  # what validation_groups reads of a store
        stream_speaker = [s for s, ids in store_ids.items() for _ in ids]
        utt_ids = [u for ids in store_ids.values() for u in ids]

    groups = validation_groups(_Ids, valid_fraction, seed)
    return {spk: [u for u in ids if production_of(u) in groups] for spk, ids in sorted(store_ids.items())}


def validation_streams(info):
    """{speaker: [the SA models that read its validation audio]}, as train.py builds the fold's
    validation items: ``cross``: every speaker of the training audio (``train_audio``) read by the
    teacher models but its own; ``matched`` / ``self``: each teacher speaker by its own model."""
    teachers = sorted(info["teachers"])
    if info["input_streams"] == "cross":
        audio = info.get("train_audio") or teachers
        return {s: [m for m in teachers if m != s] for s in sorted(audio) if any(m != s for m in teachers)}
    return {t: [t] for t in teachers}


def read_choice(folder):
    """The choice file of a fold folder; ChoiceError naming it when missing or unreadable."""
    path = Path(folder) / CHOICE_FILE
    if not path.is_file():
        raise ChoiceError(
            f"{path} does not exist: run tune_decoding.py on this fold first (it chooses each system's "
            f"decoding on the teacher speakers' validation audio)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        chosen = data["chosen"]
        for entry in chosen.values():
            entry["search"], entry["settings"]  # noqa: B018  (present)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ChoiceError(f"{path} is unreadable ({type(err).__name__}: {err})") from None
    return data


def write_choice(folder, data):
    write_json(Path(folder) / CHOICE_FILE, {"version": VERSION, **data})


class Tally:
    """Exact matches per (candidate, system) over the validation speakers, and the vote's."""

    def __init__(self):
        self.right = defaultdict(int)
        self.n = defaultdict(int)

    def add(self, candidate, system, right, n):
        self.right[(candidate, system)] += right
        self.n[(candidate, system)] += n

    def wra(self, candidate, system):
        n = self.n[(candidate, system)]
        return 100.0 * self.right[(candidate, system)] / n if n else float("nan")

    def table(self, names, systems):
        return {s: {c: round(self.wra(c, s), 4) for c in names} for s in systems if self.n[(names[0], s)]}
