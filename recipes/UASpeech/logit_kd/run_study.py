#!/usr/bin/env python3
"""Runs the leave-one-speaker-out study -- folds x teacher sets x input streams x fusions, one
``train.py`` process each -- and then writes the report (``study_report.py``).

    cd recipes/UASpeech/logit_kd
    python run_study.py                                    # the synthetic demo tree
    python run_study.py --logit_root=/data/logit_extraction --tokenizer_file=/data/tokenizer.model \\
        --folds M08 M05 --teacher_sets same_level --fusions mean transformer --seeds 5 \\
        --study_folder=results/study -- --number_of_epochs=60

Each run goes into ``<study_folder>/<fold>_<teacher_set>_<input_streams>_<fusion>/<seed>/``. A run whose
``test_results.json`` exists is finished and skipped; any other run is (re)started, and train.py
resumes it from its last checkpoint. So after a crash or Ctrl-C, run the same command again. The
arguments after ``--`` go to every train.py run unchanged. A finished run is skipped only if it was
made with the options and the data of this command (the manifest's command, or its
test_results.json): otherwise the study stops before running anything, naming the run and the
option (use another study folder; an unfinished run with other options is refused by train.py).
train.py's output is kept in ``<study_folder>/logs/``; a failing
run is reported with its command and the tail of its stderr, the others go on, and the exit status
is 1. Paths given here are taken relative to the current directory.

Each configuration and fold is trained with ``--seeds`` seeds (default 3; 5 or more for real data),
and the report averages over them. Each run uses ``--threads`` CPU threads (default 1; train.py pins
them, since results depend on them): the students are small, and oversubscribed intra-op threads
on a shared CPU made a run ~8x slower.
``--nproc_per_node=N`` launches every run with ``torchrun --standalone`` (DDP) instead; on CPU give
train.py ``-- --device=cpu --distributed_backend=gloo``.
"""

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import yaml
from tqdm import tqdm

from local.files import atomic_write
from local.folds import INPUT_STREAMS, TEACHER_SETS
from local.fusion import FUSIONS
from local.options import base_doc, describe_choice, matched_choice, read_fold_file
from local.report import MANIFEST_FILE, RESULTS_FILE, write_report

RECIPE = Path(__file__).resolve().parent
TRAIN = RECIPE / "train.py"
HPARAMS = RECIPE / "hparams"
FOLDS = ("M08", "M05", "M16", "M01")  # high, mid, low, very low
# Set by the driver for every run: not allowed among the pass-through overrides.
RESERVED = (
    "output_folder",
    "held_out",
    "teacher_set",
    "input_streams",
    "fusion",
    "logit_root",
    "tokenizer_file",
    "demo_folder",
    "seed",
    "threads",
)
TAIL_LINES = 25


def parse_args(argv):
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(
        description="Runs the study (folds x teacher sets x input streams x "
        "fusions) and writes its report; details below.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument("--logit_root", help="the SA logit extraction (default: the synthetic demo tree)")
    parser.add_argument("--tokenizer_file", help="the SA SentencePiece model (required with --logit_root)")
    parser.add_argument(
        "--demo_folder",
        default=str(RECIPE / "demo_data"),
        help="where the synthetic demo tree is (generated once); default: the recipe's demo_data",
    )
    parser.add_argument(
        "--folds",
        nargs="+",
        default=list(FOLDS),
        metavar="SPK",
        help="held-out speakers, each with hparams/fold_<SPK>.yaml (default: %(default)s)",
    )
    parser.add_argument("--teacher_sets", nargs="+", default=list(TEACHER_SETS), choices=TEACHER_SETS)
    parser.add_argument("--input_streams", nargs="+", default=["matched"], choices=INPUT_STREAMS)
    parser.add_argument("--fusions", nargs="+", default=["transformer"], choices=FUSIONS)
    parser.add_argument(
        "--study_folder",
        default="results/study",
        help="one folder per run and the report go here (default: %(default)s)",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=3,
        help="training seeds per configuration and fold: the report averages over them and its intervals "
        "hold their variance (default: %(default)s; 5 or more for real data)",
    )
    parser.add_argument("--first_seed", type=int, default=1986, help="the seeds are first_seed, first_seed + 1, ...")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads of each run (train.py's --threads, pinned: results depend on it); default: "
        "%(default)s (the students are small: more intra-op threads gain little)",
    )
    parser.add_argument(
        "--nproc_per_node",
        type=int,
        default=1,
        help="> 1: launch each run with torchrun --standalone on this many processes (DDP; "
        "on CPU add '-- --device=cpu --distributed_backend=gloo')",
    )
    parser.add_argument("--n_boot", type=int, default=2000, help="report: bootstrap replicates")
    parser.add_argument("--n_perm", type=int, default=10000, help="report: sign-flip permutations")
    parser.add_argument("--stats_seed", type=int, default=0, help="report: seed of bootstrap and permutations")
    parser.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar over the runs")
    args = parser.parse_args(argv)
    for fold in args.folds:
        if not (HPARAMS / f"fold_{fold}.yaml").is_file():
            parser.error(f"no fold file hparams/fold_{fold}.yaml for --folds {fold}")
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    if args.nproc_per_node < 1:
        parser.error("--nproc_per_node must be at least 1")
    if args.logit_root and not args.tokenizer_file:
        parser.error("--logit_root needs --tokenizer_file (the SA models' SentencePiece model)")
    for item in extra:
        if not item.startswith("--"):
            parser.error(f"train.py overrides after '--' look like --key=value, got {item!r}")
        key = item[2:].split("=", 1)[0]
        if key in RESERVED:
            parser.error(
                f"--{key} is set by the driver for every run: give it before '--' "
                f"(or as --folds/--teacher_sets/--input_streams/--fusions/--seeds/--threads/--study_folder)"
            )
    if not any(item == "--noprogressbar" for item in extra):
        extra.append("--noprogressbar")  # train.py's own bars would only fill the log files
    args.extra = extra
    return args


def data_options(logit_root, tokenizer_file, demo_folder):
    """The options that name a run's data, as absolute paths (the runs start elsewhere)."""
    tokenizer = [f"--tokenizer_file={Path(tokenizer_file).resolve()}"] if tokenizer_file else []
    if logit_root:
        return [f"--logit_root={Path(logit_root).resolve()}", *tokenizer]
    return [f"--demo_folder={Path(demo_folder).resolve()}", *tokenizer]


def plan(args):
    """The runs of the study, in order: fold, teacher set, input streams, fusion, seed."""
    study = Path(args.study_folder).resolve()
    data = data_options(args.logit_root, args.tokenizer_file, args.demo_folder)
    if not any(item.startswith("--cache_folder=") for item in args.extra):
        data.append(f"--cache_folder={study / 'cache'}")  # one packed cache for all the runs of the study
    launch = [sys.executable]
    if args.nproc_per_node > 1:  # torchrun of this very environment
        launch += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc_per_node}"]
    runs = []
    for fold in args.folds:
        for teacher_set in args.teacher_sets:
            for streams in args.input_streams:
                for fusion in args.fusions:
                    for seed in range(args.first_seed, args.first_seed + args.seeds):
                        name = f"{fold}_{teacher_set}_{streams}_{fusion}/{seed}"
                        command = [
                            *launch,
                            str(TRAIN),
                            str(HPARAMS / f"fold_{fold}.yaml"),
                            *data,
                            f"--teacher_set={teacher_set}",
                            f"--input_streams={streams}",
                            f"--fusion={fusion}",
                            f"--seed={seed}",
                            f"--threads={args.threads}",
                            f"--output_folder={study / name}",
                            *args.extra,
                        ]
                        runs.append(
                            {
                                "name": name,
                                "fold": fold,
                                "teacher_set": teacher_set,
                                "input_streams": streams,
                                "fusion": fusion,
                                "seed": seed,
                                "command": command,
                                "status": "pending",
                            }
                        )
    return study, runs


def finished(study, run):
    """A run is finished when its test_results.json exists (train.py writes it last, atomically);
    it must be the run it is named after."""
    path = study / run["name"] / RESULTS_FILE
    if not path.is_file():
        return False
    with open(path, encoding="utf-8") as handle:
        info = json.load(handle)
    keys = ("held_out", "teacher_set", "input_streams", "fusion", "seed")
    found = tuple(info.get(k) for k in keys)
    wanted = (run["fold"], run["teacher_set"], run["input_streams"], run["fusion"], run["seed"])
    if found[1] == "explicit":  # --teachers=[...] among the overrides replaces the teacher set
        found = (found[0], wanted[1], *found[2:])
    if found != wanted:
        raise ValueError(f"{path} holds the run {found}, not {wanted}: the study folder is inconsistent")
    return True


def _options(command):
    """{key: value} of the ``--key=value`` items of a train.py command (its python and paths aside)."""
    return dict(item[2:].split("=", 1) for item in command if item.startswith("--") and "=" in item)


# Where a run writes and how it is launched: not what it computes. matched_choice is compared by
# what it gives the run (planned_choice), so that a run made before the option existed (none) is
# the same run as one with --matched_choice=false.
NOT_COMPARED = ("output_folder", "cache_folder", "matched_choice")


# The options whose values decide whether and which choice applies (of the others, only whether
# the run sets them counts)
CHOICE_KEYS = ("input_streams", "teacher_set", "teachers", "matched_choice", "matched_choices")


def planned_choice(run):
    """The options the per-teacher-set choice of logit_kd.yaml (matched_choices) gives a planned run."""
    hparams_file = next(item for item in run["command"] if item.endswith(".yaml") and not item.startswith("--"))
    base, fold = read_fold_file(hparams_file)
    overrides = dict(fold)
    for key, value in _options(run["command"]).items():
        try:
            overrides[key] = yaml.safe_load(value) if key in CHOICE_KEYS else value
        except yaml.YAMLError:  # train.py refuses it with one line when it runs
            overrides[key] = value
    return matched_choice(base_doc(base), overrides)


def changed_options(study, run, previous):
    """What differs between a finished run and the run this command would make ("" when nothing):
    compared with the manifest's record of its command, or, without one, with its test_results.json
    (the options it recorded and its data)."""
    planned = {k: v for k, v in _options(run["command"]).items() if k not in NOT_COMPARED}
    with open(study / run["name"] / RESULTS_FILE, encoding="utf-8") as handle:
        info = json.load(handle)
    diffs = []
    # The options a per-teacher-set choice gives the run, as it would now and as it did (a run made
    # before the choice existed got none): a study folder of the options as written is not
    # reported as the chosen configuration's, nor the other way round.
    then, now = info.get("matched_choice", {}), planned_choice(run)
    if then != now:
        diffs.append(f"options chosen per teacher set {describe_choice(then)} -> {describe_choice(now)}")
    if previous is not None and "command" in previous:
        old = {k: v for k, v in _options(previous["command"]).items() if k not in NOT_COMPARED}
        diffs += [
            f"--{k} {old.get(k, '(unset)')} -> {planned.get(k, '(unset)')}"
            for k in sorted(set(old) | set(planned))
            if old.get(k) != planned.get(k)
        ]
        return "; ".join(diffs)
    recorded = info.get("overrides", {})
    for key, value in planned.items():
        if key in recorded and str(yaml.safe_load(value)) != str(recorded[key]):
            diffs.append(f"--{key} {recorded[key]} -> {value}")
    for key in ("logit_root", "tokenizer_file"):
        if key in planned and info.get(key) not in (None, str(Path(planned[key]).resolve())):
            diffs.append(f"--{key} {info[key]} -> {planned[key]}")
    return "; ".join(diffs)


def tail(path, lines=TAIL_LINES):
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return "".join(handle.readlines()[-lines:])
    except OSError:
        return ""


def child_environment(threads):
    """The environment of the train.py processes: this one, with the thread count of the native
    libraries set too (train.py pins torch's own with --threads)."""
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


def execute(study, run, env):
    """One train.py process; its stdout/stderr are appended to logs/<run>.{out,err}. Returns rc."""
    logs = study / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    stem = run["name"].replace("/", "_")
    out_path, err_path = logs / f"{stem}.out", logs / f"{stem}.err"
    stamp = f"==== {datetime.datetime.now().isoformat(timespec='seconds')} {shlex.join(run['command'])}\n"
    with open(out_path, "a", encoding="utf-8") as out, open(err_path, "a", encoding="utf-8") as err:
        out.write(stamp)
        err.write(stamp)
        out.flush()
        err.flush()
        start = time.monotonic()
        proc = subprocess.run(run["command"], stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env)
    run["wall_s"] = round(time.monotonic() - start, 1)
    run["returncode"] = proc.returncode
    run["logs"] = [out_path.relative_to(study).as_posix(), err_path.relative_to(study).as_posix()]
    return proc.returncode


def say(text):
    """One line above the progress bar, flushed at once (the output is often a file: nohup)."""
    tqdm.write(text)
    sys.stdout.flush()


def save_manifest(study, runs, started, threads):
    atomic_write(
        study / MANIFEST_FILE,
        lambda handle: json.dump({"started": started, "threads_per_run": threads, "runs": runs}, handle, indent=1),
    )


def main(argv=None):
    args = parse_args(argv)
    study, runs = plan(args)
    if args.dry_run:
        for run in runs:
            print(shlex.join(run["command"]))
        return 0
    study.mkdir(parents=True, exist_ok=True)
    env = child_environment(args.threads)
    started = datetime.datetime.now().isoformat(timespec="seconds")
    previous = {}
    if (study / MANIFEST_FILE).is_file():
        with open(study / MANIFEST_FILE, encoding="utf-8") as handle:
            previous = {r["name"]: r for r in json.load(handle).get("runs", [])}
    # A finished run is only skipped if this command would make the same run (checked for every
    # run before anything is run or the manifest rewritten).
    for run in runs:
        if finished(study, run):
            changed = changed_options(study, run, previous.get(run["name"]))
            if changed:
                raise ValueError(
                    f"{study / run['name']} finished with other options or data than this command's ({changed}): "
                    f"give another --study_folder (or remove that run to redo it)"
                )
            if run["name"] in previous and "command" in previous[run["name"]]:
                run["command"] = previous[run["name"]]["command"]  # as it was made
    save_manifest(study, runs, started, env["OMP_NUM_THREADS"])
    failures = []
    t0 = time.monotonic()
    bar = tqdm(runs, desc="study", unit="run", disable=args.no_progress or None, dynamic_ncols=True)
    for k, run in enumerate(bar, 1):
        bar.set_postfix_str(run["name"])
        prefix = f"[{k}/{len(runs)}] {run['name']}"
        if finished(study, run):
            run["status"] = "skipped"
            run["wall_s"] = previous.get(run["name"], {}).get("wall_s")
            say(f"{prefix}: skipped (finished: {RESULTS_FILE} present)")
        else:
            resumed = (study / run["name"] / "save").is_dir()
            run["status"] = "running"
            save_manifest(study, runs, started, env["OMP_NUM_THREADS"])
            rc = execute(study, run, env)
            if rc == 0 and finished(study, run):
                run["status"] = "finished"
                with open(study / run["name"] / RESULTS_FILE, encoding="utf-8") as handle:
                    student = json.load(handle)["student"]
                say(
                    f"{prefix}: {'resumed and ' if resumed else ''}finished in {run['wall_s']:.0f} s "
                    f"(student WER {student['WER']:.2f}, WRA {student['WRA']:.2f})"
                )
            else:
                run["status"] = "failed"
                failures.append(run)
                err_tail = tail(study / run["logs"][1]) or tail(study / run["logs"][0])
                say(
                    f"{prefix}: FAILED (exit status {rc}{'' if rc else ', no ' + RESULTS_FILE}) "
                    f"after {run['wall_s']:.0f} s\n  command: {shlex.join(run['command'])}\n"
                    f"  logs: {study / run['logs'][0]}, {study / run['logs'][1]}\n"
                    f"  --- stderr tail ---\n{err_tail.rstrip()}\n  -------------------"
                )
        save_manifest(study, runs, started, env["OMP_NUM_THREADS"])
    bar.close()
    counts = {s: sum(r["status"] == s for r in runs) for s in ("finished", "skipped", "failed")}
    print(
        f"study: {len(runs)} runs: {counts['finished']} run, {counts['skipped']} skipped, "
        f"{counts['failed']} failed; {time.monotonic() - t0:.0f} s"
    )
    try:
        text = write_report(study, n_boot=args.n_boot, n_perm=args.n_perm, seed=args.stats_seed)
    except ValueError as err:
        print(f"report: not written: {err}", file=sys.stderr)
        return 1
    print(text)
    print(f"report: {study / 'study.md'}, {study / 'study.csv'}, {study / 'study.png'}")
    if failures:
        print(
            f"FAILED runs ({len(failures)}): {', '.join(r['name'] for r in failures)}; their logs are in "
            f"{study / 'logs'}; run the same command again to retry them",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ValueError as error:  # an inconsistent study folder
        sys.exit(f"ERROR: {error}")
    except KeyboardInterrupt:
        sys.exit(
            "\ninterrupted: run the same command again to go on (finished runs are skipped, "
            "the interrupted one resumes from its last checkpoint)"
        )
