"""The study report: the student against every baseline, per held-out speaker, over training seeds,
with intervals that hold both the seed-to-seed and the test-word variance, and corrected paired
tests.

A *run* is a folder with ``test_results.json`` (written last by ``train.py``, so it marks a
finished run) beside ``test_utterances.json`` (every system's edits on every test utterance,
written by the same run); the per-utterance results must reproduce the WER / WRA of
``test_results.json``. Runs of one configuration (teacher set, input streams, fusion) and one
held-out speaker that differ only in their seed are one *cell*:

- per system: WER and WRA averaged over the seeds, their standard deviation over the seeds, and a
  95 % interval from a bootstrap that resamples the seeds and whole productions (speaker, word: the
  microphones of one production are not independent; ``significance.hierarchical_ci``);
- per baseline: the student's mean difference with the same interval, and a paired sign-flip test
  (whole productions) of the seed-averaged per-utterance errors; the p-values of a configuration's
  table are Holm-corrected together (both metrics, every fold and the pooled rows);
- ``best_single_teacher``: the teacher the run chose on its training audio (``best_single_teacher``
  of its ``test_results.json``: ``combine.RANKING_RULE``, never the test), shown with its accuracy
  there; ``best_teacher_on_test``: the one best on the test itself, an oracle-like upper figure,
  labelled so;
- systems that are the same decode (``sa_self`` and ``mean`` with one test stream; a ``mean``-fusion
  student and the ``mean`` baseline) are shown once in the tables and the figure, as "a = b".

Writes into the study folder, each file atomically: ``study.md``, ``study.csv`` (one row per cell
and system, unmerged, per-seed WRA included) and ``study.png`` (WRA per intelligibility group).
Command lines: ``study_report.py`` (a study folder), ``run_study.py`` (runs the study, then this).
"""

import csv
import io
import json
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from local import data_kind
from local.corpus import GROUPS, INTELLIGIBILITY, WORD_CATEGORIES, production_of
from local.files import atomic_write
from local.significance import hierarchical_ci, holm, paired_test

RESULTS_FILE = "test_results.json"
UTTERANCES_FILE = "test_utterances.json"  # written by train.py beside it: every system on every utterance
MANIFEST_FILE = "study_runs.json"  # written by run_study.py; optional here
STUDENT = "student"
BEST_TEACHER = "best_single_teacher"
BEST_ON_TEST = "best_teacher_on_test"
ORACLE = "oracle"
TEACHER_PREFIX = "teacher_"
# Order of the systems in tables and the figure; other baseline names follow, sorted.
SYSTEM_ORDER = (STUDENT, "sa_self", "mean", BEST_TEACHER, "majority_vote", BEST_ON_TEST, ORACLE)
NAMES = {
    STUDENT: "KD student",
    "sa_self": "held-out speaker's own SA model",
    "mean": "mean of the test streams (untrained)",
    BEST_TEACHER: "best teacher (chosen on the teachers)",
    "majority_vote": "majority vote of the teachers",
    BEST_ON_TEST: "best teacher (chosen on the test)†",
    ORACLE: "oracle of the teachers (right when any is)†",
}
GROUP_LABEL = {"very_low": "very low", "low": "low", "mid": "mid", "high": "high"}
POOLED = "pooled"
CSV_FIELDS = [
    "scope", "group", "fold", "teacher_set", "input_streams", "fusion", "n_teachers", "teachers", "synthetic_data",
    "seeds", "seed_list", "epoch_loaded", "system", "same_as", "chosen", "chosen_accuracy", "n", "n_groups",
    "WER", "WER_sd", "WER_ci_low", "WER_ci_high", "WRA", "WRA_sd", "WRA_ci_low", "WRA_ci_high", "WRA_by_seed",
    "SER", "CER", "dWER", "dWER_ci_low", "dWER_ci_high", "dWRA", "dWRA_ci_low", "dWRA_ci_high",
    "p_WER", "p_WRA", "p_WER_holm", "p_WRA_holm",
] + [f"{kind}_{c}" for c in WORD_CATEGORIES for kind in ("WRA", "n")]  # fmt: skip


# ----------------------------------------------------------------------------- data


@dataclass
class System:
    """One system of one cell, per seed and utterance (the student's utterance order)."""

    name: str
    ids: list
    edits: np.ndarray  # [seeds, utterances] word edits
    ref: np.ndarray  # [utterances] reference words (SpeechBrain's count)
    categories: list  # word category per utterance
    cer: list = field(default_factory=list)  # per seed, from test_results.json
    chosen: str = ""  # for the best single teachers: which teacher, per seed
    chosen_accuracy: str = ""  # for the one chosen on the training audio: its accuracy there (%), per seed

    @property
    def correct(self):
        return (self.edits == 0).astype(np.float64)


@dataclass
class Run:
    name: str  # the run folder, relative to the study folder
    info: dict  # test_results.json
    systems: dict  # name -> (edits [utterances], CER)
    ids: list
    ref: np.ndarray
    categories: list

    @property
    def config(self):
        return (self.info.get("teacher_set"), self.info.get("input_streams"), self.info.get("fusion"))


def load_run(folder, study_folder):
    """Reads one finished run: its test_results.json and the per-utterance results beside it."""
    folder = Path(folder)
    with open(folder / RESULTS_FILE, encoding="utf-8") as handle:
        info = json.load(handle)
    path = folder / UTTERANCES_FILE
    if not path.is_file():
        raise ValueError(f"{path}: missing (every finished run of train.py writes it beside {RESULTS_FILE})")
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    summaries = {STUDENT: info["student"], **info.get("baselines", {})}
    ref = np.array(data["ref_words"], dtype=np.int64)
    systems = {}
    for name, summary in summaries.items():
        if name not in data["systems"]:
            raise ValueError(f"{path}: no system {name!r}, which {folder / RESULTS_FILE} lists")
        edits = np.array(data["systems"][name]["edits"], dtype=np.int64)
        # Both files were written by the same run: they must agree.
        wer, wra = 100.0 * edits.sum() / max(1, ref.sum()), 100.0 * float((edits == 0).mean())
        for key, mine in (("WER", wer), ("WRA", wra)):
            if key in summary and abs(summary[key] - mine) > 1e-6:
                raise ValueError(
                    f"{path}: system {name}: {key} {mine:.4f} from the utterances, {summary[key]:.4f} "
                    f"in {folder / RESULTS_FILE}"
                )
        systems[name] = (edits, summary.get("CER"))
    name = folder.relative_to(study_folder).as_posix() if folder != study_folder else folder.name
    return Run(
        name=name, info=info, systems=systems, ids=list(data["ids"]), ref=ref, categories=list(data["categories"])
    )


def find_runs(study_folder):
    """Every finished run (a folder with test_results.json) under the study folder."""
    study_folder = Path(study_folder)
    return [load_run(p.parent, study_folder) for p in sorted(study_folder.rglob(RESULTS_FILE))]


def _best_teacher(run, on_test):
    teachers = sorted(n for n in run.systems if n.startswith(TEACHER_PREFIX))
    if not teachers:
        return None
    chosen = (run.info.get("best_single_teacher") or {}).get("name")
    if not on_test and f"{TEACHER_PREFIX}{chosen}" in teachers:
        return f"{TEACHER_PREFIX}{chosen}"  # the run's own choice, on its training audio
    if on_test:
        score = {n: float((run.systems[n][0] == 0).mean()) for n in teachers}
    else:  # a run made before it recorded its choice: its teachers' accuracy, ties by name
        accuracy = run.info.get("teacher_accuracy") or {}
        score = {n: accuracy.get(n[len(TEACHER_PREFIX) :], 0.0) for n in teachers}
    return max(teachers, key=lambda n: (score[n], [-ord(c) for c in n]))


def _training_accuracy(run, teacher):
    """A teacher's accuracy (%) on the run's training audio, as the run recorded it ('' if not)."""
    accuracy = (run.info.get("teacher_accuracy") or {}).get(teacher[len(TEACHER_PREFIX) :])
    return "" if accuracy is None else f"{100.0 * accuracy:.1f}"


def cell_systems(runs):
    """The systems of one cell (its runs differ in their seed only), stacked over the seeds."""
    first = runs[0]
    for run in runs[1:]:
        if run.ids != first.ids:
            raise ValueError(f"{run.name} and {first.name} were not tested on the same utterances")
    names = [n for n in first.systems if all(n in r.systems for r in runs)]
    systems = {}
    for name in names:
        systems[name] = System(
            name,
            first.ids,
            np.stack([r.systems[name][0] for r in runs]),
            first.ref,
            first.categories,
            cer=[r.systems[name][1] for r in runs],
        )
    for derived, on_test in ((BEST_TEACHER, False), (BEST_ON_TEST, True)):
        chosen = [_best_teacher(r, on_test) for r in runs]
        if chosen[0] is None:
            continue
        systems[derived] = System(
            derived,
            first.ids,
            np.stack([r.systems[c][0] for r, c in zip(runs, chosen)]),
            first.ref,
            first.categories,
            cer=[r.systems[c][1] for r, c in zip(runs, chosen)],
            chosen=" ".join(dict.fromkeys(c[len(TEACHER_PREFIX) :] for c in chosen)),
            chosen_accuracy=""
            if on_test
            else " ".join(dict.fromkeys(_training_accuracy(r, c) for r, c in zip(runs, chosen))),
        )
    teachers = sorted(n for n in names if n.startswith(TEACHER_PREFIX))
    if len(teachers) > 1:
        # The ceiling of any combination that picks one teacher's words per utterance: an utterance
        # counts as right when any teacher is right (fewest edits of any teacher). Not a system.
        systems[ORACLE] = System(
            ORACLE,
            first.ids,
            np.stack([np.min([r.systems[t][0] for t in teachers], axis=0) for r in runs]),
            first.ref,
            first.categories,
            cer=[None for _ in runs],
        )
    return systems


def system_order(names):
    """Known systems first (SYSTEM_ORDER), then other baselines, then each teacher alone."""
    names = list(names)
    known = [n for n in SYSTEM_ORDER if n in names]
    teachers = sorted(n for n in names if n.startswith(TEACHER_PREFIX))
    others = sorted(n for n in names if n not in known and n not in teachers)
    return known + others + teachers


# ----------------------------------------------------------------------------- statistics


def system_stats(system, n_boot=2000, seed=0):
    """Seed-averaged WER and WRA, their sd over seeds, and hierarchical 95 % intervals."""
    groups = [production_of(i) for i in system.ids]
    correct = system.correct
    wer = hierarchical_ci(system.edits, system.ref, groups, n_boot=n_boot, seed=seed)
    wra = hierarchical_ci(correct, np.ones(len(system.ids)), groups, n_boot=n_boot, seed=seed)
    per_seed_wra = 100.0 * correct.mean(1)
    per_seed_wer = 100.0 * system.edits.sum(1) / max(1, system.ref.sum())
    ddof = 1 if len(per_seed_wra) > 1 else 0
    cer = [c for c in system.cer if c is not None]
    row = {
        "n": len(system.ids), "n_groups": len(set(groups)), "seeds": len(per_seed_wra),
        "WER": wer[0], "WER_sd": float(np.std(per_seed_wer, ddof=ddof)), "WER_ci_low": wer[1], "WER_ci_high": wer[2],
        "WRA": wra[0], "WRA_sd": float(np.std(per_seed_wra, ddof=ddof)), "WRA_ci_low": wra[1], "WRA_ci_high": wra[2],
        "WRA_by_seed": " ".join(f"{v:.2f}" for v in per_seed_wra), "SER": 100.0 - wra[0],
        "CER": float(np.mean(cer)) if cer else None, "chosen": system.chosen, "chosen_accuracy": system.chosen_accuracy,
    }  # fmt: skip
    for category in WORD_CATEGORIES:
        mask = np.array([c == category for c in system.categories], dtype=bool)
        row[f"n_{category}"] = int(mask.sum())
        row[f"WRA_{category}"] = 100.0 * float(correct[:, mask].mean()) if mask.any() else None
    return row


def paired_stats(student, other, n_boot=2000, n_perm=10000, seed=0):
    """Student minus ``other`` on the same utterances: dWER, dWRA (percentage points, averaged over
    the seeds) with hierarchical intervals, and two-sided paired sign-flip tests (whole productions)
    of the seed-averaged per-utterance edits (p_WER) and sentence errors (p_WRA). dWER < 0 and
    dWRA > 0 mean the student is better; a system tested against itself gives p = 1 exactly."""
    if student.ids != other.ids or (student.ref != other.ref).any():
        raise ValueError(f"{student.name} and {other.name} are not scored on the same utterances")
    groups = [production_of(i) for i in student.ids]
    if other.edits.shape[0] != student.edits.shape[0]:  # a seed-free baseline: the same in every seed
        other = System(**{**other.__dict__, "edits": np.repeat(other.edits[:1], student.edits.shape[0], 0)})
    d_wer = hierarchical_ci(student.edits - other.edits, student.ref, groups, n_boot=n_boot, seed=seed)
    d_wra = hierarchical_ci(student.correct - other.correct, np.ones(len(groups)), groups, n_boot=n_boot, seed=seed)
    p_wer = paired_test(student.edits.mean(0), other.edits.mean(0), groups, n_perm=n_perm, seed=seed)["p_value"]
    p_wra = paired_test(1 - student.correct.mean(0), 1 - other.correct.mean(0), groups, n_perm=n_perm, seed=seed)
    return {
        "dWER": d_wer[0], "dWER_ci_low": d_wer[1], "dWER_ci_high": d_wer[2],
        "dWRA": d_wra[0], "dWRA_ci_low": d_wra[1], "dWRA_ci_high": d_wra[2],
        "p_WER": p_wer, "p_WRA": p_wra["p_value"],
    }  # fmt: skip


def _same_as(systems):
    """name -> the earlier system (in display order) whose decodes it repeats exactly, or ''."""
    names = system_order(systems)
    same = {}
    for k, name in enumerate(names):
        same[name] = next(
            (
                o
                for o in names[:k]
                if not same[o]
                and systems[o].edits.shape == systems[name].edits.shape
                and np.array_equal(systems[o].edits, systems[name].edits)
            ),
            "",
        )
    return same


def _pool(systems):
    """One system over several cells (held-out speakers: disjoint productions), per seed."""
    k = min(s.edits.shape[0] for s in systems)
    return System(
        systems[0].name,
        [i for s in systems for i in s.ids],
        np.concatenate([s.edits[:k] for s in systems], axis=1),
        np.concatenate([s.ref for s in systems]),
        [c for s in systems for c in s.categories],
        chosen=" ".join(s.chosen for s in systems if s.chosen),
        chosen_accuracy=" ".join(s.chosen_accuracy for s in systems if s.chosen_accuracy),
    )


def _rows_for(systems, base, n_boot, n_perm, seed):
    student = systems[STUDENT]
    same = _same_as(systems)
    rows = []
    for name in system_order(systems):
        row = {**base, "system": name, "same_as": same[name], **system_stats(systems[name], n_boot, seed)}
        if name not in (STUDENT, ORACLE):  # the oracle is a ceiling, not a competitor: no test
            row.update(paired_stats(student, systems[name], n_boot, n_perm, seed))
        rows.append(row)
    return rows


def _cells(runs):
    """{config: {fold: [runs over seeds]}}, configurations in a fixed order, folds by intelligibility."""
    configs = {}
    for run in runs:
        configs.setdefault(run.config, {}).setdefault(run.info.get("held_out", ""), []).append(run)
    ordered = {}
    for config in sorted(configs, key=_config_key):
        folds = configs[config]
        ordered[config] = {
            f: sorted(folds[f], key=lambda r: r.info.get("seed", 0))
            for f in sorted(folds, key=lambda f: (INTELLIGIBILITY.get(f, 1e9), f))
        }
    return ordered


def study_rows(runs, n_boot=2000, n_perm=10000, seed=0):
    """Per configuration: one row per fold and system (intelligibility order), then one per system
    pooled over the configuration's folds; the p-values of each configuration Holm-corrected."""
    rows = []
    for config, folds in _cells(runs).items():
        config_rows = []
        pooled_systems = {}
        for fold, members in folds.items():
            info = members[0].info
            systems = cell_systems(members)
            base = {
                "scope": "fold", "group": info.get("group", ""), "fold": fold, "teacher_set": config[0],
                "input_streams": config[1], "fusion": config[2], "n_teachers": len(info.get("teachers", [])),
                "teachers": " ".join(info.get("teachers", [])),
                "synthetic_data": any(bool(r.info.get("synthetic_data")) for r in members),
                "seed_list": " ".join(str(r.info.get("seed", "")) for r in members),
                "epoch_loaded": " ".join(str(r.info.get("epoch_loaded", "")) for r in members),
            }  # fmt: skip
            config_rows += _rows_for(systems, base, n_boot, n_perm, seed)
            for name, system in systems.items():
                pooled_systems.setdefault(name, []).append(system)
        if len(folds) > 1:
            names = [n for n, s in pooled_systems.items() if len(s) == len(folds)]
            pooled = {n: _pool(pooled_systems[n]) for n in names}
            base = {
                "scope": POOLED, "group": POOLED, "fold": " ".join(folds), "teacher_set": config[0],
                "input_streams": config[1], "fusion": config[2], "n_teachers": "", "teachers": "",
                "synthetic_data": any(bool(r.info.get("synthetic_data")) for m in folds.values() for r in m),
                "seed_list": "", "epoch_loaded": "",
            }  # fmt: skip
            config_rows += _rows_for(pooled, base, n_boot, n_perm, seed)
        tested = [(r, key) for r in config_rows if r["system"] not in (STUDENT, ORACLE) for key in ("p_WER", "p_WRA")]
        for (row, key), p in zip(tested, holm([row[key] for row, key in tested])):
            row[key + "_holm"] = p
        rows += config_rows
    return rows


# Order of the configurations: defaults and simpler settings first, unknown values last.
CONFIG_ORDER = (
    ("same_level", "all_others", "explicit"),
    ("self", "matched", "cross"),
    ("mean", "weights", "attention", "transformer"),
)


def _config_key(config):
    return tuple((order.index(v) if v in order else len(order), str(v)) for order, v in zip(CONFIG_ORDER, config))


# ----------------------------------------------------------------------------- output


def _csv_value(value):
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if isinstance(value, (float, np.floating)):
        return repr(float(value))
    return value


def write_csv(rows, path):
    def _write(handle):
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(row.get(k)) for k in CSV_FIELDS})

    atomic_write(path, _write)


def _p(value):
    if value is None:
        return ""
    return "1" if value >= 1.0 else (f"{value:.3f}" if value >= 0.001 else "< 0.001")


def _name(row):
    """A system's readable name: what it is, the fusion of a student, the teacher a choice picked."""
    name = NAMES.get(row["system"], row["system"])
    if row["system"] == STUDENT:
        name = f"{name} ({row['fusion']})"
    if row["system"] == BEST_TEACHER and row["scope"] == "fold" and row.get("chosen_accuracy"):
        name += f" ({row['chosen']}, {row['chosen_accuracy']} % on the training audio)"
    elif row["system"] in (BEST_TEACHER, BEST_ON_TEST) and row["scope"] == "fold":
        name += f" ({row['chosen']})"
    return name


def _label(row, bold=True):
    """The row's name, and the names of the systems that are the same decode (folded into it)."""
    name = _name(row)
    if bold and row["system"] == STUDENT:
        name = f"**{name}**"
    return " = ".join([name, *row.get("merged", [])])


def group_label(group, with_range=True):
    """``high (86–95 %)``: the group and its speakers' intelligibility range."""
    if group not in GROUPS:
        return GROUP_LABEL.get(group, group)
    values = [INTELLIGIBILITY[s] for s in GROUPS[group]]
    label = GROUP_LABEL[group]
    return f"{label} ({min(values):g}–{max(values):g} %)" if with_range else label


def _where(row):
    if row["scope"] == POOLED:
        return "all (pooled)", row["fold"]
    return group_label(row["group"]), row["fold"]


def _shown(rows):
    """The rows of a table: systems that repeat an earlier one's decodes are folded into it."""
    shown = []
    for row in rows:
        if row["system"].startswith(TEACHER_PREFIX):
            continue
        if row["same_as"]:
            target = next(r for r in reversed(shown) if r["system"] == row["same_as"] and r["fold"] == row["fold"])
            target.setdefault("merged", []).append(_name(row))
            continue
        shown.append(dict(row))
    return shown


def _chosen_line(folds):
    """The options the choice per teacher set (matched_choices) gave the runs of a configuration, as
    a line above its table ([] when it gave none: runs made before it, cross, --matched_choice=false)."""
    found = {
        json.dumps(r.info.get("matched_choice") or {}, sort_keys=True): r.info.get("matched_choice") or {}
        for members in folds.values()
        for r in members
    }
    if found == {"{}": {}}:
        return []
    shown = [", ".join(f"`{k}: {v}`" for k, v in c.items()) or "none" for c in found.values()]
    every = "every run" if len(found) == 1 else "**differs between runs**"
    return [f"Options chosen per teacher set (`matched_choices`), {every}: {' / '.join(shown)}.", ""]


def markdown(rows, cells, not_finished, n_boot, n_perm, seed, folder_name):
    runs = [r for folds in cells.values() for members in folds.values() for r in members]
    kind = runs_kind(runs)
    seeds = sorted({r.info.get("seed") for r in runs})
    lines = ["# Logit-level KD on UASpeech: student vs baselines", ""]
    if kind == data_kind.REHEARSAL:
        lines += [
            "> **REHEARSAL CORPUS: SYNTHETIC SPEECH, REAL MODELS.** These runs read the logits of "
            "SpeechBrain models trained on speech from Debian's synthesizers with simulated dysarthria "
            "(`make_rehearsal.py`), not UASpeech: real confusions and confidences of real models, but "
            "not UASpeech results.",
            "",
        ]
    if kind == data_kind.DEMO:
        lines += [
            "> **SYNTHETIC DATA.** These runs read the embedded synthetic demo logit tree (`synthetic_data: "
            "true`), not UASpeech: the numbers show that the recipe and the report run, and how the "
            "methods compare on data shaped like the real SA decodes; they are not UASpeech results.",
            "",
        ]
    lines += [
        f"Study folder `{folder_name}`: {len(runs)} finished run(s), seeds {' '.join(map(str, seeds))}"
        + (f"; **not finished: {', '.join(not_finished)}**." if not_finished else "."),
        "Decoding: teacher-forced greedy on the decoder logits (argmax, cut at the first `</s>`, "
        "`decode_ids(...).split(' ')`), scored with SpeechBrain `ErrorRateStats`, as in the SA pipeline: "
        "its WRA_pieces (pieces exactly the reference's) equals the free-running greedy one (the student is causal), "
        "its WRA can differ from the free-running WRA either way (another segmentation of a word), "
        "its WER is optimistic.",
        "",
        "- WER and WRA (word recognition accuracy, 100 − SER) in %, the mean over the training seeds ± their "
        f"standard deviation, and a 95 % interval from a bootstrap ({n_boot} replicates, seed {seed}) that "
        "resamples both the seeds and whole productions (speaker, word: the microphones of one spoken word are "
        "one sample, not seven).",
        "- ΔWRA = WRA(student) − WRA(system), percentage points, averaged over the seeds, with the same interval "
        "(> 0: the student is better).",
        f"- p: two-sided paired sign-flip test ({n_perm} permutations, whole productions flipped) of the "
        "student's seed-averaged per-utterance word edits (p WER) and sentence errors (p WRA) against the "
        "system's; **Holm-corrected over every test of the table** (both metrics, every fold and the pooled rows).",
        "- The held-out speaker's own SA model (`sa_self`) is the test input of `matched` and `self` students: "
        "those figures are not speaker-independent; `cross` (the teachers' models on the held-out audio) is "
        "the unseen-speaker setting. Systems that are the same decode are shown once (`a = b`).",
        "- best teacher (chosen on the teachers): the teacher model ranked first on the run's training audio "
        "(never the held-out speaker's; train and validation items): highest accuracy, an exact tie "
        "broken by the mean log-probability it gives the reference pieces, then by name; its accuracy there in "
        "brackets. † chosen on the test set itself: an oracle-like upper figure no system could pick. Each "
        "teacher alone is in `study.csv`.",
        "- pooled: the configuration's folds concatenated (utterance-weighted; the folds' productions are disjoint).",
        "",
    ]
    for config in cells:
        title = f"teacher_set={config[0]}, input_streams={config[1]}, fusion={config[2]}"
        sel = _shown([r for r in rows if (r["teacher_set"], r["input_streams"], r["fusion"]) == config])
        lines += [f"## {title}", "", *_chosen_line(cells[config])]
        lines += [
            "| group | fold | system | n | seeds | WER % (± sd) [95 % CI] | WRA % (± sd) [95 % CI] | "
            "ΔWRA [95 % CI] | p WER (Holm) | p WRA (Holm) |",
            "|---|---|---|---:|---:|---|---|---|---:|---:|",
        ]
        for row in sel:
            group, fold = _where(row)
            student = row["system"] in (STUDENT, ORACLE)  # no difference tested (the oracle: a ceiling)
            lines.append(
                f"| {group} | {fold} | {_label(row)} | {row['n']} | {row['seeds']} | "
                f"{row['WER']:.1f} (± {row['WER_sd']:.1f}) [{row['WER_ci_low']:.1f}, {row['WER_ci_high']:.1f}] | "
                f"{row['WRA']:.1f} (± {row['WRA_sd']:.1f}) [{row['WRA_ci_low']:.1f}, {row['WRA_ci_high']:.1f}] | "
                + (
                    "| | |"
                    if student
                    else f"{row['dWRA']:+.1f} [{row['dWRA_ci_low']:+.1f}, {row['dWRA_ci_high']:+.1f}] | "
                    f"{_p(row['p_WER_holm'])} | {_p(row['p_WRA_holm'])} |"
                )
            )
        lines += [
            "",
            f"WRA (%) per word category ({title}; D digits, L letters, C commands, CW common words, "
            "UW uncommon words; mean over the seeds):",
            "",
            "| group | fold | system | " + " | ".join(WORD_CATEGORIES) + " | all |",
            "|---|---|---|" + "---:|" * (len(WORD_CATEGORIES) + 1),
        ]
        for row in sel:
            group, fold = _where(row)
            cells_ = [f"{row[f'WRA_{c}']:.1f}" if row[f"WRA_{c}"] is not None else "–" for c in WORD_CATEGORIES]
            lines.append(f"| {group} | {fold} | {_label(row)} | " + " | ".join(cells_) + f" | {row['WRA']:.1f} |")
        lines.append("")
    lines += [
        "Files: `study.csv` (every number, one row per fold and system, each teacher alone and each seed's WRA "
        "included), `study.png` (WRA per intelligibility group with the 95 % intervals).",
        "",
    ]
    return "\n".join(lines)


def figure(rows, path, kind):
    """WRA per held-out speaker (x: intelligibility group, ascending), one bar per distinct system with
    its 95 % interval over seeds and productions; one panel per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fold_rows = [r for r in rows if r["scope"] == "fold"]
    configs = list(dict.fromkeys((r["teacher_set"], r["input_streams"], r["fusion"]) for r in fold_rows))
    folds = list(dict.fromkeys(r["fold"] for r in fold_rows))  # rows are sorted by intelligibility
    palette = plt.get_cmap("tab10")
    fig, axes = plt.subplots(len(configs), 1, figsize=(11, 3.8 * len(configs) + 1.0), squeeze=False)
    for ax, config in zip(axes[:, 0], configs):
        sel = _shown([r for r in fold_rows if (r["teacher_set"], r["input_streams"], r["fusion"]) == config])
        labels = list(dict.fromkeys(_label(r, bold=False) for r in sel))
        width = 0.8 / max(1, len(labels))
        for k, label in enumerate(labels):
            xs, ys, err = [], [], [[], []]
            for x, fold in enumerate(folds):
                for r in (r for r in sel if r["fold"] == fold and _label(r, bold=False) == label):
                    xs.append(x - 0.4 + width * (k + 0.5))
                    ys.append(r["WRA"])
                    err[0].append(r["WRA"] - r["WRA_ci_low"])
                    err[1].append(r["WRA_ci_high"] - r["WRA"])
            wrapped = "\n= ".join(textwrap.fill(part, 42) for part in label.split(" = "))
            ax.bar(
                xs, ys, width, yerr=err, capsize=2, label=wrapped, color=palette(k % 10), error_kw={"elinewidth": 0.8}
            )
        tick = {}
        for r in sel:
            seeds = r["seeds"]
            tick[r["fold"]] = f"{group_label(r['group'])}\n{r['fold']}: n = {r['n']}, {seeds} seed{'s' * (seeds > 1)}"
        ax.set_xticks(range(len(folds)))
        ax.set_xticklabels([tick.get(f, f) for f in folds], fontsize=8)
        ax.set_xlim(-0.6, len(folds) - 0.4)
        ax.set_ylim(0, 100)
        ax.set_ylabel("WRA (%)")
        streams = {
            "matched": "matched streams (the held-out speaker's own SA model at test)",
            "self": "own streams (the held-out speaker's own SA model at test)",
            "cross": "cross streams (the teachers' models on the held-out audio: unseen speaker)",
        }
        ax.set_title(
            f"{streams.get(config[1], config[1])}; teachers: {config[0].replace('_', ' ')}; student: {config[2]}",
            fontsize=9,
        )
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    title = "Word recognition accuracy by intelligibility group (mean over seeds, 95 % CI over seeds and words)"
    if kind == data_kind.DEMO:
        title = "SYNTHETIC DATA (demo tree, not UASpeech)\n" + title
    if kind == data_kind.REHEARSAL:
        title = "REHEARSAL CORPUS: SYNTHETIC speech, real models (not UASpeech)\n" + title
    fig.suptitle(title, fontsize=10, color="black" if kind == data_kind.REAL else "darkred")
    fig.subplots_adjust(hspace=0.6)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, metadata={"Software": None}, bbox_inches="tight")
    plt.close(fig)
    atomic_write(path, lambda handle: handle.write(buffer.getvalue()), binary=True)


def _not_finished(study_folder, runs):
    """Runs listed in study_runs.json (by run_study.py) that have no test_results.json."""
    manifest = Path(study_folder) / MANIFEST_FILE
    if not manifest.is_file():
        return []
    with open(manifest, encoding="utf-8") as handle:
        listed = json.load(handle).get("runs", [])
    done = {r.name for r in runs}
    return [f"{r['name']} ({r.get('status', 'pending')})" for r in listed if r["name"] not in done]


def runs_kind(runs):
    """The one data kind of a set of runs (local/data_kind.py); ValueError when they mix kinds, whose
    figures cannot stand side by side."""
    kinds = {data_kind.of_info(r.info) for r in runs}
    if len(kinds) > 1:
        raise ValueError(
            f"runs of different data ({', '.join(sorted(kinds))}) in one study: their figures cannot stand side by side"
        )
    return kinds.pop()


def write_report(study_folder, n_boot=2000, n_perm=10000, seed=0):
    """Writes study.md, study.csv and study.png into the study folder; returns the Markdown."""
    study_folder = Path(study_folder)
    runs = find_runs(study_folder)
    if not runs:
        raise ValueError(f"no finished run (no {RESULTS_FILE}) under {study_folder}")
    cells = _cells(runs)
    rows = study_rows(runs, n_boot=n_boot, n_perm=n_perm, seed=seed)
    text = markdown(rows, cells, _not_finished(study_folder, runs), n_boot, n_perm, seed, study_folder.resolve().name)
    write_csv(rows, study_folder / "study.csv")
    figure(rows, study_folder / "study.png", runs_kind(runs))
    atomic_write(study_folder / "study.md", lambda handle: handle.write(text))
    return text
