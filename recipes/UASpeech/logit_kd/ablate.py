#!/usr/bin/env python3
"""The ablation that chooses the student's configuration, on the teacher speakers only.

Every candidate of the grid (``hparams/ablation.yaml``: per setting, ``matched`` and ``cross``, the
configurations to compare) is trained on every fold and teacher set by ``run_study.py``, one study
folder per candidate. Per setting and teacher set, the candidate with the best validation WRA
averaged over the folds is chosen: the validation productions are the training audio's (the teacher
speakers', for ``cross`` every non-held-out speaker's), never the held-out speaker's, so the test
figures shown beside them choose nothing. The untrained fusion (the mean of the streams; for
``matched`` the speaker's own model alone) is a row of every table and can be chosen too.

    cd recipes/UASpeech/logit_kd
    python ablate.py                                        # the synthetic demo tree
    python ablate.py --logit_root=/data/logit_extraction --tokenizer_file=/data/tokenizer.model \\
        --ablation_folder=results/ablation --seeds 3

Writes ``<ablation_folder>/ablation.md`` (the tables) and ``ablation.json`` (the choices, and the
``matched`` ones as train.py's ``matched_choices`` option, printed at the end: the defaults of a
``matched`` run are the rehearsal corpus's choices until you set your own). Each
candidate's runs are in ``<ablation_folder>/<setting>/<candidate>/`` and its run_study.py output in
``<ablation_folder>/logs/``; finished runs are skipped, so after a crash run the same command again.
``--jobs`` candidates run at once (one CPU thread each). ``--report`` writes the tables from the
finished runs and runs nothing. The runs share the packed logits in ``<ablation_folder>/cache``
(``--cache_folder``): on a full extraction with ``cross`` that is tens of GB (one store per fold,
teacher set and temperature), and it can be removed once every run has finished.
"""

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from local.ablation import (
    AblationError,
    as_matched_choices,
    candidate_config,
    choices,
    collect,
    load_grid,
    progress,
    render,
)
from local.corpus import SPEAKERS
from local.files import atomic_write
from local.folds import TEACHER_SETS

from run_study import data_options

RECIPE = Path(__file__).resolve().parent
RUN_STUDY = RECIPE / "run_study.py"
FOLDS = ("M08", "M05", "M16", "M01")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--logit_root", help="the SA logit extraction (default: the synthetic demo tree)")
    parser.add_argument("--tokenizer_file", help="the SA SentencePiece model (required with --logit_root)")
    parser.add_argument("--demo_folder", default=str(RECIPE / "demo_data"), help="the demo tree (default: %(default)s)")
    parser.add_argument("--grid", default=str(RECIPE / "hparams" / "ablation.yaml"), help="default: %(default)s")
    parser.add_argument("--ablation_folder", default="results/ablation", help="default: %(default)s")
    parser.add_argument(
        "--cache_folder", help="the packed logits, shared by every run (default: <ablation_folder>/cache)"
    )
    parser.add_argument("--settings", nargs="+", help="settings of the grid to run (default: all)")
    parser.add_argument("--folds", nargs="+", default=list(FOLDS), metavar="SPK")
    parser.add_argument("--teacher_sets", nargs="+", default=list(TEACHER_SETS), choices=TEACHER_SETS)
    parser.add_argument("--seeds", type=int, default=1, help="seeds per run (default: %(default)s)")
    parser.add_argument("--first_seed", type=int, default=1986)
    parser.add_argument("--jobs", type=int, default=2, help="candidates trained at once (default: %(default)s)")
    parser.add_argument("--report", action="store_true", help="write the tables from the finished runs only")
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.jobs < 1:
        parser.error("--seeds and --jobs must be at least 1")
    if args.logit_root and not args.tokenizer_file:
        parser.error("--logit_root needs --tokenizer_file (the SA models' SentencePiece model)")
    if args.logit_root and not Path(args.logit_root).is_dir():
        parser.error(f"--logit_root {args.logit_root}: no such folder")
    if args.tokenizer_file and not Path(args.tokenizer_file).is_file():
        parser.error(f"--tokenizer_file {args.tokenizer_file}: no such file")
    for option, values in (
        ("--folds", args.folds),
        ("--teacher_sets", args.teacher_sets),
        ("--settings", args.settings),
    ):
        if values and len(set(values)) < len(values):
            parser.error(f"{option} {' '.join(values)}: a value is given twice")
    for fold in args.folds:
        if not (RECIPE / "hparams" / f"fold_{fold}.yaml").is_file():
            parser.error(f"no fold file hparams/fold_{fold}.yaml for --folds {fold}")
    try:
        grid = load_grid(args.grid)
    except AblationError as err:
        parser.exit(2, f"ERROR: {err}\n")
    for setting in args.settings or []:
        if setting not in grid:
            parser.error(f"--settings {setting}: not a setting of {args.grid} ({', '.join(grid)})")
    args.grid_spec = {s: grid[s] for s in (args.settings or grid)}
    args.seed_list = list(range(args.first_seed, args.first_seed + args.seeds))
    return args


def jobs(args):
    """One run_study.py command per candidate: (setting, candidate, command)."""
    folder = Path(args.ablation_folder).resolve()
    data = data_options(args.logit_root, args.tokenizer_file, args.demo_folder)
    out = []
    for setting, spec in args.grid_spec.items():
        for name in spec["candidates"]:
            streams, fusion, overrides = candidate_config(spec, name)
            command = [
                sys.executable,
                str(RUN_STUDY),
                *data,
                f"--study_folder={folder / setting / name}",
                "--folds",
                *args.folds,
                "--teacher_sets",
                *args.teacher_sets,
                "--input_streams",
                streams,
                "--fusions",
                fusion,
                f"--seeds={args.seeds}",
                f"--first_seed={args.first_seed}",
                "--threads=1",
                "--no_progress",
                # run_study.py's own report is a by-product here: few replicates keep it quick
                "--n_boot=200",
                "--n_perm=1000",
                "--",
                # one packed cache for every candidate (its builds are atomic and locked)
                f"--cache_folder={Path(args.cache_folder or folder / 'cache').resolve()}",
                # the candidates differ from logit_kd.yaml as written, not from what its
                # per-teacher-set choice (matched_choices) would make of them: that is what a grid chooses
                "--matched_choice=false",
                *overrides,
            ]
            out.append((setting, name, command))
    return out


def prepare_demo_tree(args):
    """On the demo tree, every (model, speaker) pair the runs read is written here, once, before
    the runs start side by side (two runs adding pairs to one tree at once would race)."""
    if args.logit_root:
        return
    from local.synthetic import DemoTreeError, ensure_demo_tree

    pairs = [(m, s) for m in SPEAKERS for s in SPEAKERS] if "cross" in args.grid_spec else []
    try:
        ensure_demo_tree(args.demo_folder, pairs=pairs)
    except DemoTreeError as err:
        sys.exit(f"ERROR: {err}")


def run_all(args, todo):
    """The candidates' run_study.py processes, ``--jobs`` at a time; returns the failed ones. On
    Ctrl-C or SIGTERM the running ones are stopped too (their train.py runs resume next time)."""
    logs = Path(args.ablation_folder) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    waiting, running, failed = list(todo), [], []
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        _run(args, logs, waiting, running, failed)
    finally:
        for _, _, proc, _log, _ in running:
            proc.terminate()
        for _, _, proc, log, _ in running:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
    return failed


def _run(args, logs, waiting, running, failed):
    while waiting or running:
        while waiting and len(running) < args.jobs:
            setting, name, command = waiting.pop(0)
            log = open(logs / f"{setting}_{name}.log", "a", encoding="utf-8")
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            running.append((setting, name, proc, log, time.monotonic()))
            print(f"started {setting}/{name} (log: {log.name})", flush=True)
        time.sleep(2)
        for entry in list(running):
            setting, name, proc, log, start = entry
            if proc.poll() is None:
                continue
            running.remove(entry)
            log.close()
            status = "finished" if proc.returncode == 0 else f"FAILED (exit status {proc.returncode})"
            print(f"{setting}/{name}: {status} after {time.monotonic() - start:.0f} s", flush=True)
            if proc.returncode:
                failed.append(f"{setting}/{name} (log: {logs / f'{setting}_{name}.log'})")


def main(argv=None):
    args = parse_args(argv)
    folder = Path(args.ablation_folder)
    scope = (args.grid_spec, args.folds, args.teacher_sets, args.seed_list)
    failed = []
    try:
        collect(folder, *scope)  # runs already there must be this grid's, before anything is run
        if not args.report:
            prepare_demo_tree(args)
            failed = run_all(args, jobs(args))
        text = render(folder, *scope)
        chosen = choices(folder, *scope)
        done, total = progress(collect(folder, *scope), *scope)
    except AblationError as err:
        sys.exit(f"ERROR: {err}")
    except KeyboardInterrupt:
        sys.exit("\ninterrupted: run the same command again to go on (finished runs are skipped)")
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / "ablation.md", lambda handle: handle.write(text))
    # ablation.json (the choices) marks a finished ablation: written only when every run finished
    finished = not failed and done == total
    # the matched choices as train.py's option, to use them as the defaults of a matched run
    matched, unsaid = as_matched_choices(chosen, args.grid_spec)
    if finished:
        record = {"chosen": chosen, "matched_choices": matched, "matched_choices_unsaid": unsaid}
        atomic_write(folder / "ablation.json", lambda handle: json.dump(record, handle, indent=1))
    elif (folder / "ablation.json").is_file():
        (folder / "ablation.json").unlink()
    print(text)
    print("chosen on the teacher speakers' validation: " + "; ".join(f"{k}: {v}" for k, v in chosen.items()))
    if matched and finished:
        flow = ", ".join(f"{t}: {{{', '.join(f'{k}: {v}' for k, v in o.items())}}}" for t, o in matched.items())
        print(f'as train.py\'s option (or matched_choices in hparams/logit_kd.yaml): --matched_choices="{{{flow}}}"')
    for teacher_set, why in unsaid.items():
        print(f"matched, {teacher_set}: {why}; --matched_choice=false keeps the options as written")
    if failed:
        sys.exit("FAILED: " + ", ".join(failed) + "; run the same command again to retry them")
    return 0


if __name__ == "__main__":
    sys.exit(main())
