"""The ablation of the student (``ablate.py``): its grid, its runs' figures, the choice and the table.

The choice is made on the teacher speakers only. A run's ``test_results.json`` holds, beside the
held-out speaker's figures, the ``validation`` figures of the checkpoint it kept (whole (speaker,
word) productions of the training audio, never the held-out speaker's); ``choose`` reads those and
nothing else, so the held-out speaker's data cannot change a choice (tested). For ``matched`` a
validation item is one teacher speaker's own stream, as the test is the held-out speaker's own
stream: the untrained counterpart (``WRA_mean``) is then that speaker's own model alone, what
``sa_self`` is on the test.
"""

import difflib
import json
import re
from pathlib import Path

import yaml

from local import data_kind
from local.options import base_keys, check_value

RESULTS_FILE = "test_results.json"
UNTRAINED = "untrained"  # the mean of the streams: for matched, the speaker's own model alone
RUN_STUDY_KEYS = ("input_streams", "fusion")  # chosen by run_study.py's options, not overrides
RESERVED = (
    "output_folder",
    "held_out",
    "teacher_set",
    "logit_root",
    "tokenizer_file",
    "demo_folder",
    "seed",
    "threads",
    "cache_folder",
    "debug",
    "matched_choice",  # false: a candidate differs from logit_kd.yaml as written
)
# What decides the validation items: the same for every candidate of a setting (its `base`), or
# the candidates would be chosen on different items
BASE_ONLY = ("valid_fraction", "cross_audio", "teachers", "exclude_speakers", "logit_root")
NAME = re.compile(r"[A-Za-z0-9_.-]+")
BASE_HPARAMS = Path(__file__).resolve().parent.parent / "hparams" / "logit_kd.yaml"


class AblationError(ValueError):
    """A bad grid file or an inconsistent ablation folder: one line says which and where."""


def load_grid(path):
    """``{setting: {"base": {...}, "candidates": {name: {...}}}}`` from the grid file, checked."""
    path = Path(path)
    try:
        grid = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise AblationError(f"{path}: cannot read the grid: {str(err).splitlines()[0]}") from None
    settings = grid.get("settings") if isinstance(grid, dict) else None
    if not isinstance(settings, dict) or not settings:
        raise AblationError(f"{path}: no `settings:` mapping")
    known = base_keys(BASE_HPARAMS)
    for setting, spec in settings.items():
        where = f"{path}: settings.{setting}"
        if not isinstance(setting, str) or not NAME.fullmatch(setting):
            raise AblationError(f"{where}: a setting's name is letters, digits, '_', '.' or '-' (a folder name)")
        if not isinstance(spec, dict) or set(spec) - {"base", "candidates", "not_eligible"}:
            raise AblationError(f"{where}: give `base`, `candidates` and `not_eligible` only")
        candidates = spec.get("candidates")
        if not isinstance(candidates, dict) or not candidates:
            raise AblationError(f"{where}: no candidates")
        spec.setdefault("base", {})
        spec.setdefault("not_eligible", {})
        barred = spec["not_eligible"]
        if not isinstance(barred, dict) or not all(isinstance(v, str) and v.strip() for v in barred.values()):
            raise AblationError(f"{where}.not_eligible: give a mapping of candidate -> why it cannot be chosen")
        for name in barred:
            if name not in candidates:
                raise AblationError(f"{where}.not_eligible: {name} is not a candidate")
        for name, overrides in {"base": spec["base"], **candidates}.items():
            if name == UNTRAINED:
                raise AblationError(f"{where}: `{UNTRAINED}` is the name of the untrained fusion's row")
            if not isinstance(name, str) or not NAME.fullmatch(name):
                raise AblationError(f"{where}.{name}: a candidate's name is letters, digits, '_', '.' or '-'")
            if not isinstance(overrides, dict) or not all(isinstance(k, str) for k in overrides):
                raise AblationError(f"{where}.{name}: give a mapping of options")
            for key, value in overrides.items():
                if key in RESERVED:
                    raise AblationError(f"{where}.{name}: --{key} is set by ablate.py for every run")
                if key not in known:
                    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
                    hint = f" (did you mean {close[0]}?)" if close else ""
                    raise AblationError(f"{where}.{name}: unknown option {key}{hint}")
                if name != "base" and key in BASE_ONLY:
                    raise AblationError(f"{where}.{name}: {key} decides the validation items: give it in `base`")
                problem = check_value(key, value)
                if problem:
                    raise AblationError(f"{where}.{name}: {problem}")
        tests = {}
        for name in candidates:
            config = {**spec["base"], **candidates[name]}
            if config.get("fusion") == "mean":
                raise AblationError(f"{where}.{name}: the mean fusion is the `{UNTRAINED}` row of every table already")
            # self and matched are tested alike (the held-out speaker's own stream), cross is not
            tests[name] = "every teacher model" if config.get("input_streams") == "cross" else "the own model"
        if len(set(tests.values())) > 1:
            raise AblationError(f"{where}: its candidates are tested on different inputs ({tests}): one setting each")
    return settings


def candidate_config(spec, name):
    """(input_streams, fusion, [train.py overrides]) of a candidate."""
    config = {**spec["base"], **spec["candidates"][name]}
    streams = config.pop("input_streams", "matched")
    fusion = config.pop("fusion", "transformer")
    overrides = [f"--{k}={_yaml_value(v)}" for k, v in sorted(config.items())]
    return streams, fusion, overrides


def _yaml_value(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    return str(value)


def describe(spec, name):
    """What a candidate changes, as it reads in a table."""
    changes = spec["candidates"][name]
    return ", ".join(f"`{k}: {_yaml_value(v)}`" for k, v in changes.items()) or "`logit_kd.yaml` as written"


def run_folder(ablation, setting, name, fold, teacher_set, spec, seed):
    streams, fusion, _ = candidate_config(spec, name)
    return Path(ablation) / setting / name / f"{fold}_{teacher_set}_{streams}_{fusion}" / str(seed)


# What ablate.py and run_study.py set for every run: not part of a candidate's configuration
DRIVER_KEYS = set(RESERVED) | {"input_streams", "fusion", "noprogressbar", "held_out", "teacher_set"}


def read_run(folder, spec=None, name=None):
    """The figures of one finished run (None when it has not finished): validation (teacher
    speakers) apart from test (the held-out speaker). With ``spec`` and ``name``, the run must be
    that candidate's as the grid says it now (a grid edited since gives its old runs away here)."""
    path = Path(folder) / RESULTS_FILE
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        validation = info.get("validation")
        if info.get("partial"):
            raise AblationError(f"{path}: a partial run ({info['partial']}): remove it and run ablate.py again")
        if not isinstance(validation, dict) or not {"WRA", "WRA_mean"} <= set(validation):
            raise AblationError(f"{path}: no validation figures (a run of an older train.py): remove it and run again")
        if spec is not None:
            config = {**spec["base"], **spec["candidates"][name]}
            wanted = (config.pop("input_streams", "matched"), config.pop("fusion", "transformer"))
            wanted += ({k: str(v) for k, v in config.items()},)
            recorded = {k: str(v) for k, v in info.get("overrides", {}).items() if k not in DRIVER_KEYS}
            found = (info.get("input_streams"), info.get("fusion"), recorded)
            if found != wanted:
                raise AblationError(
                    f"{path}: made with {found}, not with the grid's candidate {name} {wanted}: the grid changed "
                    f"since; give another --ablation_folder (or remove that candidate's folder)"
                )
        baselines = info["baselines"]
        return {
            "validation": {"student": float(validation["WRA"]), UNTRAINED: float(validation["WRA_mean"])},
            "test": {
                "student": info["student"]["WRA"],
                UNTRAINED: baselines["mean"]["WRA"],
                **{k: baselines[k]["WRA"] for k in BASELINES if k in baselines},
            },
            "teachers": info.get("teachers", []),
            "data_kind": data_kind.of_info(info),
        }
    except (OSError, ValueError, KeyError, TypeError) as err:
        if isinstance(err, AblationError):
            raise
        raise AblationError(f"{path}: not a results file of train.py ({type(err).__name__}: {err})") from None


def collect(ablation, grid, folds, teacher_sets, seeds):
    """``{(setting, teacher_set): {candidate: {fold: [run figures per seed]}}}``, finished runs only."""
    found = {}
    for setting, spec in grid.items():
        for teacher_set in teacher_sets:
            cell = found.setdefault((setting, teacher_set), {})
            for name in spec["candidates"]:
                for fold in folds:
                    runs = [
                        read_run(run_folder(ablation, setting, name, fold, teacher_set, spec, s), spec, name)
                        for s in seeds
                    ]
                    if all(r is not None for r in runs):
                        cell.setdefault(name, {})[fold] = runs
    return found


def _mean(values):
    values = list(values)
    return sum(values) / len(values)


def scores(cell, folds, part):
    """``{row: {fold: WRA}}`` of a table cell, averaged over seeds, ``part`` = validation or test.
    The untrained row comes from the first candidate's runs (every candidate scores it on the same
    items)."""
    rows = {name: {f: _mean(r[part]["student"] for r in runs[f]) for f in folds} for name, runs in cell.items()}
    first = next(iter(cell.values()))
    rows[UNTRAINED] = {f: _mean(r[part][UNTRAINED] for r in first[f]) for f in folds}
    return rows


def choose(cell, folds, not_eligible=()):
    """The row (a candidate, or ``untrained``) with the highest validation WRA averaged over the
    folds, the candidates ``not_eligible`` (the grid's: over the time limit, say) left out. A tie
    goes to the untrained fusion (training must earn its place), then to the candidate listed
    first (the options as written). Reads the validation figures only."""
    complete = {name: runs for name, runs in cell.items() if all(f in runs for f in folds) and name not in not_eligible}
    if not complete:
        return None
    valid = scores(complete, folds, "validation")
    best = max(_mean(valid[name].values()) for name in valid)
    order = [UNTRAINED, *(name for name in valid if name != UNTRAINED)]
    return next(name for name in order if _mean(valid[name].values()) >= best - 1e-9)


# The test's baselines printed under each table (test figures only: they have no counterpart on
# the validation items)
BASELINES = {
    "sa_self": "the held-out speaker's own SA model (with `cross`: a reference, no unseen-speaker system has it)",
    "majority_vote": "the teachers' majority vote (ties: the teacher ranked first on the training audio)",
}


def _fmt(value):
    return "" if value is None else f"{value:.1f}"


DATA = {
    data_kind.DEMO: "SYNTHETIC demo tree: generated logits, nothing about UASpeech.",
    data_kind.REHEARSAL: "Rehearsal corpus: SYNTHETIC speech (Debian's synthesizers, simulated dysarthria), "
    "real SpeechBrain models trained on it. Not UASpeech.",
    data_kind.REAL: "Real logits.",
}


def progress(found, grid, folds, teacher_sets, seeds):
    """(finished runs, the grid's runs) of ``collect``'s result."""
    runs = sum(len(f) for cell in found.values() for c in cell.values() for f in c.values())
    total = sum(len(spec["candidates"]) for spec in grid.values()) * len(teacher_sets) * len(folds) * len(seeds)
    return runs, total


def render(ablation, grid, folds, teacher_sets, seeds, require_complete=False):
    """The ablation's Markdown: per setting and teacher set, every candidate's validation WRA (the
    teacher speakers: what chooses) and test WRA (the held-out speakers: reported, chooses nothing).
    ``require_complete``: refuse an ablation with unfinished runs (a table for the docs)."""
    found = collect(ablation, grid, folds, teacher_sets, seeds)
    runs = [r for cell in found.values() for c in cell.values() for f in c.values() for r in f]
    if not runs:
        raise AblationError(f"{ablation}: no finished runs of this grid")
    kinds = {r["data_kind"] for r in runs}
    if len(kinds) > 1:
        raise AblationError(f"{ablation}: runs of different data ({', '.join(sorted(kinds))}) in one ablation")
    lines = [DATA[kinds.pop()]]
    _, total = progress(found, grid, folds, teacher_sets, seeds)
    if len(runs) < total:
        if require_complete:
            raise AblationError(f"{ablation}: {len(runs)} of the grid's {total} runs are finished")
        lines += ["", f"**Unfinished: {len(runs)} of {total} runs.** Rows without every fold are not chosen from."]
    lines.append("")
    lines.append(
        f"WRA %, teacher-forced greedy, mean over seed(s) {', '.join(map(str, seeds))}. **valid**: the "
        "teacher speakers' validation productions (never the held-out speaker's), on the kept checkpoint; "
        "the row with the best mean chooses (✓; a row marked not eligible is left out; a tie goes to `untrained`, "
        "then to the row above). "
        "**test**: the held-out speakers, reported and never used to choose. `untrained`: the mean of the streams (for "
        "`matched` one stream: the speaker's own model alone, `sa_self` on the test)."
    )
    for (setting, teacher_set), cell in found.items():
        if not cell:
            continue
        spec = grid[setting]
        chosen = choose(cell, folds, spec["not_eligible"])
        base = ", ".join(f"`{k}: {_yaml_value(v)}`" for k, v in spec["base"].items())
        lines.append(
            f"\n**{setting}, teachers `{teacher_set}`** (every run, where its row does not say otherwise: {base})\n"
        )
        header = ["row", "differs by"] + [f"valid {f}" for f in folds] + ["valid mean"]
        header += [f"test {f}" for f in folds] + ["test mean"]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("| --- | --- | " + " | ".join(["---:"] * (2 * len(folds) + 2)) + " |")
        rows = {name: runs for name, runs in cell.items() if all(f in runs for f in folds)}
        valid = scores(rows, folds, "validation") if rows else {}
        test = scores(rows, folds, "test") if rows else {}
        for name in [*spec["candidates"], UNTRAINED]:
            if name not in valid:
                lines.append(f"| {name} | unfinished |" + " |" * (2 * len(folds) + 2))
                continue
            what = describe(spec, name) if name != UNTRAINED else "no training: the mean of the streams"
            if name in spec["not_eligible"]:
                what += f" (not eligible: {spec['not_eligible'][name]})"
            mark = " ✓" if name == chosen else ""
            row = [f"{name}{mark}", what, *(_fmt(valid[name][f]) for f in folds), _fmt(_mean(valid[name].values()))]
            row += [*(_fmt(test[name][f]) for f in folds), _fmt(_mean(test[name].values()))]
            lines.append("| " + " | ".join(row) + " |")
        if rows:
            first = next(iter(rows.values()))
            for baseline, what in BASELINES.items():
                if all(baseline in r["test"] for f in folds for r in first[f]):
                    per_fold = {f: _mean(r["test"][baseline] for r in first[f]) for f in folds}
                    row = [f"`{baseline}`", what, *([""] * (len(folds) + 1))]
                    row += [*(_fmt(per_fold[f]) for f in folds), _fmt(_mean(per_fold.values()))]
                    lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def choices(ablation, grid, folds, teacher_sets, seeds):
    """``{"<setting>/<teacher_set>": chosen row}`` of the finished cells."""
    found = collect(ablation, grid, folds, teacher_sets, seeds)
    return {f"{s}/{t}": choose(cell, folds, grid[s]["not_eligible"]) for (s, t), cell in found.items() if cell}


def as_matched_choices(chosen, grid):
    """``{teacher set: options}`` for train.py's ``matched_choices`` from the ``matched`` setting's
    choices (``choices``' result): a candidate's options on top of its base, ``input_streams: self``
    as ``matched_items: own``; {} for the written options (no option changed). A teacher set whose
    choice no options can say (``untrained``: the speaker's own model alone, or another fusion) is
    left out and named in the second value."""
    spec = grid.get("matched")
    out, unsaid = {}, {}
    for key, name in chosen.items():
        setting, _, teacher_set = key.partition("/")
        if setting != "matched" or spec is None or name is None:
            continue
        if name == UNTRAINED:
            unsaid[teacher_set] = "no training was chosen: the speaker's own model alone (sa_self)"
            continue
        config = {**spec["base"], **spec["candidates"][name]}
        streams = config.pop("input_streams", "matched")
        if config.pop("fusion", "transformer") != "transformer" or streams not in ("matched", "self"):
            unsaid[teacher_set] = f"{name} changes the fusion or the test input, which matched_choices may not"
            continue
        if streams == "self":
            config["matched_items"] = "own"
        out[teacher_set] = config
    return out, unsaid
