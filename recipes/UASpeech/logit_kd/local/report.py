"""The study report: the student against every baseline, per held-out speaker, with clustered
confidence intervals and paired tests, from the per-utterance results of the runs.

A *run* is a folder with ``test_results.json`` (written last by ``train.py``, so it marks a
finished run) beside ``test_utterances.json`` (every system's edits on every test utterance,
written by the same run); the per-utterance results must reproduce the WER / WRA of
``test_results.json``.

Per run and system: WER and WRA with 95 % cluster-bootstrap intervals that resample whole
productions (speaker, word) -- the microphones of one production are not independent -- and, for
every baseline, the paired difference to the student with its bootstrap interval and a paired
sign-flip test (``significance.py``, same clusters). ``teacher_*`` baselines (each teacher alone)
are summarised by the best one *chosen on the test set* (optimistic: an oracle choice no deployed
system could make); all of them stay in the CSV. Folds of one configuration are also pooled.

Writes into the study folder, each file atomically: ``study.md``, ``study.csv`` (one row per run
and system), ``study.png`` (WRA per held-out speaker / intelligibility group, CI error bars).
Command lines: ``study_report.py`` (a study folder), ``run_study.py`` (runs the study, then this).
"""

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from local.corpus import INTELLIGIBILITY, WORD_CATEGORIES, production_of
from local.files import atomic_write
from local.significance import bootstrap_ci, paired_test

RESULTS_FILE = "test_results.json"
UTTERANCES_FILE = "test_utterances.json"  # written by train.py beside it: every system on every utterance
MANIFEST_FILE = "study_runs.json"  # written by run_study.py; optional here
STUDENT = "student"
BEST_TEACHER = "best_single_teacher"
TEACHER_PREFIX = "teacher_"
BEST_TEACHER_RULE = (
    "the teacher_* baseline with the highest test WRA (ties: lower WER, then name): "
    "chosen on the test set, hence optimistic"
)
# Order of the systems in tables and the figure; other baseline names follow, sorted.
SYSTEM_ORDER = (STUDENT, "sa_self", "mean", BEST_TEACHER, "majority_vote")
GROUP_LABEL = {"very_low": "very low", "low": "low", "mid": "mid", "high": "high"}
POOLED = "pooled"
CSV_FIELDS = [
    "scope",
    "run",
    "group",
    "fold",
    "teacher_set",
    "input_streams",
    "fusion",
    "n_teachers",
    "teachers",
    "synthetic_data",
    "epoch_loaded",
    "system",
    "chosen",
    "n",
    "n_groups",
    "WER",
    "WER_ci_low",
    "WER_ci_high",
    "WRA",
    "WRA_ci_low",
    "WRA_ci_high",
    "SER",
    "CER",
    "edits",
    "ref_words",
    "dWER",
    "dWER_ci_low",
    "dWER_ci_high",
    "dWRA",
    "dWRA_ci_low",
    "dWRA_ci_high",
    "p_WER",
    "p_WRA",
] + [f"{kind}_{c}" for c in WORD_CATEGORIES for kind in ("WRA", "n")]


# ----------------------------------------------------------------------------- data


@dataclass
class System:
    """One system of one run, per utterance, aligned on the student's utterance order."""

    name: str
    ids: list
    edits: np.ndarray  # per-utterance word edits
    ref: np.ndarray  # per-utterance reference words (SpeechBrain's count)
    correct: np.ndarray  # 1 if the utterance is exactly right (what WRA counts)
    categories: list  # word category per utterance (None if the id is not a UASpeech id)
    summary: dict = field(default_factory=dict)  # its entry in test_results.json
    chosen: str = ""  # for best_single_teacher: which teacher


@dataclass
class Run:
    name: str  # the run folder, relative to the study folder
    info: dict  # test_results.json
    systems: dict  # name -> System (student first, then baselines; + best_single_teacher)

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
    ids, ref = data["ids"], np.array(data["ref_words"], dtype=np.int64)
    systems = {}
    for name, summary in summaries.items():
        if name not in data["systems"]:
            raise ValueError(f"{path}: no system {name!r}, which {folder / RESULTS_FILE} lists")
        edits = np.array(data["systems"][name]["edits"], dtype=np.int64)
        system = System(
            name=name,
            ids=ids,
            edits=edits,
            ref=ref,
            correct=(edits == 0).astype(np.int64),
            categories=list(data["categories"]),
            summary=summary,
        )
        # Both files were written by the same run: they must agree.
        wer = 100.0 * system.edits.sum() / max(1, system.ref.sum())
        wra = 100.0 * system.correct.mean()
        for key, mine in (("WER", wer), ("WRA", wra)):
            if key in summary and abs(summary[key] - mine) > 1e-6:
                raise ValueError(
                    f"{path}: system {name}: {key} {mine:.4f} from the utterances, {summary[key]:.4f} "
                    f"in {folder / RESULTS_FILE}"
                )
        systems[name] = system
    teachers = [s for n, s in systems.items() if n.startswith(TEACHER_PREFIX)]
    if teachers:
        best = max(
            teachers, key=lambda s: (s.correct.mean(), -s.edits.sum() / max(1, s.ref.sum()), [-ord(c) for c in s.name])
        )
        systems[BEST_TEACHER] = System(**{**best.__dict__, "name": BEST_TEACHER, "chosen": best.name})
    name = folder.relative_to(study_folder).as_posix() if folder != study_folder else folder.name
    return Run(name=name, info=info, systems=systems)


def find_runs(study_folder):
    """Every finished run (a folder with test_results.json) under the study folder."""
    study_folder = Path(study_folder)
    return [load_run(p.parent, study_folder) for p in sorted(study_folder.rglob(RESULTS_FILE))]


def system_order(names):
    """Known systems first (SYSTEM_ORDER), then other baselines, then each teacher alone."""
    names = list(names)
    known = [n for n in SYSTEM_ORDER if n in names]
    teachers = sorted(n for n in names if n.startswith(TEACHER_PREFIX))
    others = sorted(n for n in names if n not in known and n not in teachers)
    return known + others + teachers


def _run_sort_key(run):
    speaker = run.info.get("held_out", "")
    return (INTELLIGIBILITY.get(speaker, 1e9), speaker, run.name)


# ----------------------------------------------------------------------------- statistics


def system_stats(system, n_boot=2000, seed=0):
    """n, WER and WRA with cluster-bootstrap 95 % intervals, and WRA per word category."""
    groups = [production_of(i) for i in system.ids]
    wer, wer_lo, wer_hi = bootstrap_ci(system.edits, system.ref, groups, n_boot=n_boot, seed=seed)
    wra, wra_lo, wra_hi = bootstrap_ci(system.correct, np.ones_like(system.correct), groups, n_boot=n_boot, seed=seed)
    row = {
        "n": len(system.ids),
        "n_groups": len(set(groups)),
        "WER": wer,
        "WER_ci_low": wer_lo,
        "WER_ci_high": wer_hi,
        "WRA": wra,
        "WRA_ci_low": wra_lo,
        "WRA_ci_high": wra_hi,
        "SER": 100.0 - wra,
        "edits": int(system.edits.sum()),
        "ref_words": int(system.ref.sum()),
    }
    for category in WORD_CATEGORIES:
        mask = np.array([c == category for c in system.categories], dtype=bool)
        row[f"n_{category}"] = int(mask.sum())
        row[f"WRA_{category}"] = 100.0 * float(system.correct[mask].mean()) if mask.any() else None
    return row


def paired_stats(student, other, n_boot=2000, n_perm=10000, seed=0):
    """Student minus ``other`` on the same utterances: dWER, dWRA (percentage points) with paired
    cluster-bootstrap intervals, and two-sided paired sign-flip tests (whole (speaker, word) groups)
    on per-utterance edits (p_WER) and on per-utterance sentence errors (p_WRA).

    dWER < 0 and dWRA > 0 mean the student is better. The test of a system against itself gives
    p = 1 exactly."""
    if student.ids != other.ids or (student.ref != other.ref).any():
        raise ValueError(f"{student.name} and {other.name} are not scored on the same utterances")
    groups = [production_of(i) for i in student.ids]
    d_wer = bootstrap_ci(student.edits - other.edits, student.ref, groups, n_boot=n_boot, seed=seed)
    d_wra = bootstrap_ci(
        student.correct - other.correct, np.ones_like(student.correct), groups, n_boot=n_boot, seed=seed
    )
    p_wer = paired_test(student.edits, other.edits, groups, n_perm=n_perm, seed=seed)["p_value"]
    p_wra = paired_test(1 - student.correct, 1 - other.correct, groups, n_perm=n_perm, seed=seed)["p_value"]
    return {
        "dWER": d_wer[0],
        "dWER_ci_low": d_wer[1],
        "dWER_ci_high": d_wer[2],
        "dWRA": d_wra[0],
        "dWRA_ci_low": d_wra[1],
        "dWRA_ci_high": d_wra[2],
        "p_WER": p_wer,
        "p_WRA": p_wra,
    }


def _pool(systems, name):
    """Concatenates one system over several runs (different held-out speakers: disjoint groups)."""
    chosen = " ".join(f"{s.chosen}" for s in systems if s.chosen)
    return System(
        name=name,
        ids=[i for s in systems for i in s.ids],
        edits=np.concatenate([s.edits for s in systems]),
        ref=np.concatenate([s.ref for s in systems]),
        correct=np.concatenate([s.correct for s in systems]),
        categories=[c for s in systems for c in s.categories],
        chosen=chosen,
    )


def _rows_for(systems, base, n_boot, n_perm, seed, cer=None):
    """CSV rows of one run (or one pooled configuration): the student, then every other system."""
    student = systems[STUDENT]
    rows = []
    for name in system_order(systems):
        system = systems[name]
        row = {**base, "system": name, "chosen": system.chosen, **system_stats(system, n_boot, seed)}
        if cer is not None:
            row["CER"] = system.summary.get("CER")
        if name != STUDENT:
            row.update(paired_stats(student, system, n_boot, n_perm, seed))
        rows.append(row)
    return rows


def study_rows(runs, n_boot=2000, n_perm=10000, seed=0):
    """Per configuration: one row per run and system (intelligibility order), then one per system
    pooled over the configuration's folds."""
    rows = []
    for config, members in _configs(runs).items():
        for run in members:
            info = run.info
            base = {
                "scope": "run",
                "run": run.name,
                "group": info.get("group", ""),
                "fold": info.get("held_out", ""),
                "teacher_set": config[0],
                "input_streams": config[1],
                "fusion": config[2],
                "n_teachers": len(info.get("teachers", [])),
                "teachers": " ".join(info.get("teachers", [])),
                "synthetic_data": bool(info.get("synthetic_data")),
                "epoch_loaded": info.get("epoch_loaded", ""),
            }
            rows += _rows_for(run.systems, base, n_boot, n_perm, seed, cer=True)
        if len(members) < 2:
            continue
        names = [n for n in members[0].systems if all(n in r.systems for r in members)]
        pooled = {n: _pool([r.systems[n] for r in members], n) for n in names}
        base = {
            "scope": POOLED,
            "run": "",
            "group": POOLED,
            "fold": " ".join(r.info.get("held_out", "") for r in members),
            "teacher_set": config[0],
            "input_streams": config[1],
            "fusion": config[2],
            "n_teachers": "",
            "teachers": "",
            "synthetic_data": any(bool(r.info.get("synthetic_data")) for r in members),
            "epoch_loaded": "",
        }
        rows += _rows_for(pooled, base, n_boot, n_perm, seed)
    return rows


# Order of the configurations: defaults and simpler settings first, unknown values last.
CONFIG_ORDER = (
    ("same_level", "all_others", "explicit"),
    ("self", "matched", "cross"),
    ("mean", "weights", "attention", "transformer"),
)


def _config_key(config):
    return tuple((order.index(v) if v in order else len(order), str(v)) for order, v in zip(CONFIG_ORDER, config))


def _configs(runs):
    """Runs grouped by configuration (teacher set, input streams, fusion), each in intelligibility order."""
    configs = {}
    for run in sorted(runs, key=_run_sort_key):
        configs.setdefault(run.config, []).append(run)
    return dict(sorted(configs.items(), key=lambda kv: _config_key(kv[0])))


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
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS, extrasaction="raise", lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(row.get(k)) for k in CSV_FIELDS})

    atomic_write(path, _write)


def _ci(row, key, digits=1):
    return f"{row[key]:.{digits}f} [{row[key + '_ci_low']:.{digits}f}, {row[key + '_ci_high']:.{digits}f}]"


def _signed_ci(row, key):
    return f"{row[key]:+.1f} [{row[key + '_ci_low']:+.1f}, {row[key + '_ci_high']:+.1f}]"


def _p(value):
    if value is None:
        return ""
    return "1" if value >= 1.0 else (f"{value:.3f}" if value >= 0.001 else "< 0.001")


def _label(row):
    if row["system"] == BEST_TEACHER:
        return f"best single teacher† ({row['chosen']})" if row["scope"] == "run" else "best single teacher†"
    return f"**{row['system']}**" if row["system"] == STUDENT else row["system"]


def _where(row):
    if row["scope"] == POOLED:
        return "all (pooled)", row["fold"]
    return GROUP_LABEL.get(row["group"], row["group"]), row["fold"]


def markdown(rows, runs, not_finished, n_boot, n_perm, seed, folder_name):
    synthetic = sorted({r.info.get("held_out", r.name) for r in runs if r.info.get("synthetic_data")})
    lines = ["# Logit-level KD on UASpeech: student vs baselines", ""]
    if synthetic:
        all_synthetic = len(synthetic) == len({r.info.get("held_out", r.name) for r in runs})
        lines += [
            f"> **SYNTHETIC DATA{'' if all_synthetic else ' (some runs)'}.** "
            f"{'These runs' if all_synthetic else 'The runs of ' + ', '.join(synthetic)} read the "
            "embedded synthetic demo logit tree (`synthetic_data: true`), not UASpeech: the numbers only "
            "show that the recipe and the report run. They say nothing about UASpeech.",
            "",
        ]
    lines += [
        f"Study folder `{folder_name}`: {len(runs)} finished run(s)"
        + (f"; **not finished: {', '.join(not_finished)}**." if not_finished else "."),
        "Decoding: teacher-forced greedy on the decoder logits (argmax, cut at the first `</s>`, "
        "`decode_ids(...).split(' ')`), scored with SpeechBrain `ErrorRateStats`, as in the SA pipeline; "
        "every system is re-scored from its `wer_test*.txt` file.",
        "",
        f"- WER and WRA (word recognition accuracy = exact-match rate = 100 − SER) in %, with 95 % "
        f"cluster-bootstrap percentile intervals ({n_boot} replicates, seed {seed}) that resample whole "
        "(speaker, word) groups: the microphones of one production are one sample, not seven.",
        "- ΔWRA = WRA(student) − WRA(system), percentage points, with a paired cluster-bootstrap 95 % interval "
        "(> 0: the student is better).",
        f"- p: two-sided paired sign-flip test of the student against the system on per-utterance word edits "
        f"(p WER) and on per-utterance sentence errors (p WRA), whole (speaker, word) groups flipped, "
        f"{n_perm} permutations (smallest possible p = {1 / (n_perm + 1):.1e}); a system identical to the "
        "student gives p = 1.",
        "- `sa_self`: the held-out speaker's own SA model alone; `mean`: the untrained probability mean of the "
        "same test streams (with `matched`/`self` input there is one test stream, so both equal the SA model).",
        f"- † best single teacher: {BEST_TEACHER_RULE}. Each teacher alone is in `study.csv`.",
        "- pooled: the configuration's folds concatenated (utterance-weighted; the speakers' groups are disjoint); "
        "the pooled best single teacher is each fold's own choice.",
        "",
    ]
    runs_by_config = _configs(runs)
    lines += [
        "## Runs",
        "",
        "| group | fold | teacher set | input streams | fusion | teachers | epoch | test utterances |",
        "|---|---|---|---|---|---|---:|---:|",
    ]
    for config, members in runs_by_config.items():
        for run in members:
            info = run.info
            teachers = info.get("teachers", [])
            lines.append(
                f"| {GROUP_LABEL.get(info.get('group'), info.get('group'))} | {info.get('held_out')} | "
                f"{config[0]} | {config[1]} | {config[2]} | {len(teachers)}: {' '.join(teachers)} | "
                f"{info.get('epoch_loaded', '')} | {info.get('n_utterances', '')} |"
            )
    lines.append("")
    for config in runs_by_config:
        sel = [
            r
            for r in rows
            if (r["teacher_set"], r["input_streams"], r["fusion"]) == config
            and not r["system"].startswith(TEACHER_PREFIX)
        ]
        title = f"teacher_set={config[0]}, input_streams={config[1]}, fusion={config[2]}"
        lines += [
            f"## {title}",
            "",
            "| group | fold | system | n | WER % [95 % CI] | WRA % [95 % CI] | ΔWRA [95 % CI] | p WER | p WRA |",
            "|---|---|---|---:|---|---|---|---:|---:|",
        ]
        for row in sel:
            group, fold = _where(row)
            student = row["system"] == STUDENT
            lines.append(
                f"| {group} | {fold} | {_label(row)} | {row['n']} | {_ci(row, 'WER')} | {_ci(row, 'WRA')} | "
                f"{'' if student else _signed_ci(row, 'dWRA')} | {'' if student else _p(row['p_WER'])} | "
                f"{'' if student else _p(row['p_WRA'])} |"
            )
        lines += [
            "",
            f"WRA (%) per word category ({title}; D digits, L letters, C commands, CW common words, "
            "UW uncommon words):",
            "",
            "| group | fold | system | " + " | ".join(WORD_CATEGORIES) + " | all |",
            "|---|---|---|" + "---:|" * (len(WORD_CATEGORIES) + 1),
        ]
        for row in sel:
            group, fold = _where(row)
            cells = [f"{row[f'WRA_{c}']:.1f}" if row[f"WRA_{c}"] is not None else "–" for c in WORD_CATEGORIES]
            lines.append(f"| {group} | {fold} | {_label(row)} | " + " | ".join(cells) + f" | {row['WRA']:.1f} |")
        lines.append("")
    lines += [
        "Files: `study.csv` (every number, one row per run and system, each teacher alone included), "
        "`study.png` (WRA per held-out speaker with the 95 % intervals).",
        "",
    ]
    return "\n".join(lines)


def figure(rows, path, synthetic):
    """WRA per held-out speaker (x: intelligibility group, ascending), one bar per system, CI bars;
    one panel per configuration (teacher set, input streams, fusion)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["scope"] == "run" and not r["system"].startswith(TEACHER_PREFIX)]
    configs = list(dict.fromkeys((r["teacher_set"], r["input_streams"], r["fusion"]) for r in rows))
    systems = system_order({r["system"] for r in rows})
    folds = list(dict.fromkeys(r["fold"] for r in rows))  # rows are sorted by intelligibility: one x axis
    group_of_fold = {r["fold"]: r["group"] for r in rows}
    colours = {s: plt.get_cmap("tab10")(k % 10) for k, s in enumerate(systems)}
    fig, axes = plt.subplots(len(configs), 1, figsize=(10, 2.9 * len(configs) + 0.8), squeeze=False)
    for ax, config in zip(axes[:, 0], configs):
        sel = [r for r in rows if (r["teacher_set"], r["input_streams"], r["fusion"]) == config]
        present = [s for s in systems if any(r["system"] == s for r in sel)]
        width = 0.8 / max(1, len(present))
        for k, name in enumerate(present):
            xs, ys, err = [], [], [[], []]
            for x, fold in enumerate(folds):
                for r in (r for r in sel if r["fold"] == fold and r["system"] == name):
                    xs.append(x - 0.4 + width * (k + 0.5))
                    ys.append(r["WRA"])
                    err[0].append(r["WRA"] - r["WRA_ci_low"])
                    err[1].append(r["WRA_ci_high"] - r["WRA"])
            label = "best single teacher\n(chosen on test)" if name == BEST_TEACHER else name
            ax.bar(xs, ys, width, yerr=err, capsize=2, label=label, color=colours[name], error_kw={"elinewidth": 0.8})
        ax.set_xticks(range(len(folds)))
        ax.set_xticklabels([f"{GROUP_LABEL.get(group_of_fold[f], group_of_fold[f])}\n{f}" for f in folds])
        ax.set_xlim(-0.6, len(folds) - 0.4)
        ax.set_ylim(0, 100)
        ax.set_ylabel("WRA (%)")
        ax.set_title(f"teacher_set={config[0]}, input_streams={config[1]}, fusion={config[2]}", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    title = "WRA by intelligibility group (95 % cluster-bootstrap CI)"
    if synthetic:
        title = "SYNTHETIC DATA (demo tree, not UASpeech) - " + title
    fig.suptitle(title, fontsize=11, color="darkred" if synthetic else "black")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, metadata={"Software": None})
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


def write_report(study_folder, n_boot=2000, n_perm=10000, seed=0):
    """Writes study.md, study.csv and study.png into the study folder; returns the Markdown."""
    study_folder = Path(study_folder)
    runs = find_runs(study_folder)
    if not runs:
        raise ValueError(f"no finished run (no {RESULTS_FILE}) under {study_folder}")
    rows = study_rows(runs, n_boot=n_boot, n_perm=n_perm, seed=seed)
    text = markdown(rows, runs, _not_finished(study_folder, runs), n_boot, n_perm, seed, study_folder.resolve().name)
    write_csv(rows, study_folder / "study.csv")
    figure(rows, study_folder / "study.png", any(r.info.get("synthetic_data") for r in runs))
    atomic_write(study_folder / "study.md", lambda handle: handle.write(text))
    return text
