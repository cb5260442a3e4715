#!/usr/bin/env python3
"""Real data, word level: combine the SA models' own decodes of an unseen speaker, fitted on the
teacher speakers only.

The SA project's ``cross_testing/<MODEL>/wer_<SPK>.txt`` files are SpeechBrain ``ErrorRateStats``
files: SA model MODEL decoding speaker SPK's audio with its own test search (beam search + CTC +
TransformerLM). Every model on every other speaker gives, for each held-out speaker, the word-level
``cross`` setting on real data: the fold's teacher models decode the held-out speaker's audio, and
the same models' decodes of the *other teacher speakers'* audio are the only data a combination may
be fitted or chosen on. Per fold (held-out speaker) and teacher set (``same_level``, ``all_others``):

- ``best single (teachers)``: the model with the highest word recognition accuracy (WRA) on the
  teacher speakers' audio (each teacher speaker decoded by the other teachers' models; an exact tie
  by name: these files hold words, not logits, ``combine.RANKING_RULE``);
- ``majority vote``: the most frequent whole hypothesis; ties to the model ranked best on the
  teacher speakers (``combine.VOTE_RULE``, the project's one tie rule: ``compare.py`` on the same
  files gives the same vote; the number of tied utterances is reported);
- ``weighted vote``: each model votes with log((K - 1) p / (1 - p)), p its accuracy on the teacher
  speakers and K the number of words of the list (the optimal weight of independent voters);
- ``weighted vote (same group)``: the same with accuracies on the teacher speakers of the held-out
  speaker's intelligibility group only (``all_others`` folds);
- ``mean of models``: the average single model (per utterance, the share of models exactly right);
- ``oracle``: any model exactly right (an upper bound, not a system), and ``best single (test)``:
  the model chosen on the held-out speaker itself (oracle-like: no system could choose it so).

Intervals: 95 % cluster bootstrap over productions (the microphones of one spoken word are one
sample); p: paired sign-flip tests of each combination against the best single model chosen on the
teacher speakers, on per-utterance exactness, Holm-corrected over the whole table. The file names
are not trusted: each file's speaker is read from its utterance ids (two files of the SA project are
stored under another speaker's name).

Usage (from recipes/UASpeech/logit_kd)::

    python word_fusion.py /path/to/cross_testing [--out results/word_fusion] [--n_boot 2000] [--n_perm 10000]

Writes ``word_fusion.json`` (every number) and ``word_fusion.md`` (the tables) into ``--out``.
"""

import argparse
import sys
from pathlib import Path

import numpy as np

from local.combine import best_single, pick, vote, vote_weight
from local.corpus import HELD_OUT, SPEAKERS, intelligibility_group, parse_utterance_id, production_of
from local.files import atomic_write, write_json
from local.folds import TEACHER_SETS, teacher_speakers
from local.significance import bootstrap_ci, holm, paired_test
from local.tables import markdown_table
from local.wer_files import read_wer_file

FOLDS = ("M08", "M05", "M16", "M01")  # high, mid, low, very low
COMBINATIONS = ("best_single", "majority_vote", "weighted_vote", "weighted_vote_group", "mean_of_models")
UPPER = ("oracle", "best_single_test")
LABELS = {
    "best_single": "best single (teachers)",
    "majority_vote": "majority vote",
    "weighted_vote": "weighted vote",
    "weighted_vote_group": "weighted vote (same group)",
    "mean_of_models": "mean of models",
    "oracle": "oracle‡",
    "best_single_test": "best single (test)‡",
}


class CrossTestingError(ValueError):
    """A cross-testing folder that cannot be read as described."""


def read_cross_testing(folder):
    """{(model, speaker): parsed file} of ``<folder>/<MODEL>/wer_*.txt``; the speaker is read from
    the utterance ids. Returns (files, notes) where notes name the files stored under another name."""
    folder = Path(folder)
    paths = sorted(folder.glob("*/wer_*.txt"))
    if not paths:
        raise CrossTestingError(f"no <MODEL>/wer_<SPK>.txt files under {folder}")
    files, notes = {}, []
    for path in paths:
        model = path.parent.name
        if model not in SPEAKERS:
            raise CrossTestingError(f"{path}: the folder {model} is not a UASpeech speaker's SA model")
        parsed = read_wer_file(path)
        speakers = {parse_utterance_id(u.id)["speaker"] for u in parsed.utterances}
        if len(speakers) != 1:
            raise CrossTestingError(f"{path}: utterances of several speakers {sorted(speakers)}")
        (speaker,) = speakers
        if path.stem != f"wer_{speaker}":
            notes.append(f"{path.relative_to(folder)} holds speaker {speaker}'s utterances")
        if (model, speaker) in files:
            raise CrossTestingError(f"{path}: a second file of SA model {model} on speaker {speaker}")
        files[(model, speaker)] = parsed
    return files, notes


def accuracies(files, models, speakers):
    """Per model: (exact-match accuracy, utterances) over its files on ``speakers``' audio."""
    out = {}
    for m in models:
        utts = [u for s in speakers if s != m and (m, s) in files for u in files[(m, s)].utterances]
        out[m] = (sum(u.correct for u in utts) / len(utts), len(utts)) if utts else (0.0, 0)
    return out


def combine_fold(files, held_out, teacher_set):
    """Per-utterance edits and exactness of every combination on the held-out speaker's audio."""
    teachers = teacher_speakers(held_out, teacher_set)
    models = [m for m in teachers if (m, held_out) in files]
    if not models:
        raise CrossTestingError(f"no file of a teacher model of {held_out} ({teacher_set}) on {held_out}'s audio")
    tables = {m: files[(m, held_out)].by_id() for m in models}
    ids = sorted(set.intersection(*(set(t) for t in tables.values())))
    for i in ids:
        if len({tuple(tables[m][i].ref) for m in models}) != 1:
            raise CrossTestingError(f"utterance {i}: the files of {models} disagree on its reference")
    acc = accuracies(files, models, teachers)
    group = [s for s in teachers if intelligibility_group(s) == intelligibility_group(held_out)]
    acc_group = accuracies(files, models, group) if teacher_set == "all_others" and group else None
    rank = [acc[m][0] for m in models]
    # the closed word list the models choose from: the words of the teacher speakers' audio
    n_words = len({tuple(u.ref) for (m, s), f in files.items() if m in models and s in teachers for u in f.utterances})
    weights = [vote_weight(*acc[m], n_words) for m in models]
    weights_group = [vote_weight(*acc_group[m], n_words) for m in models] if acc_group else None
    best = best_single(rank, models)
    test_rank = [np.mean([tables[m][i].correct for i in ids]) for m in models]
    best_test = best_single(test_rank, models)

    per = {name: {"edits": [], "right": []} for name in COMBINATIONS + UPPER}
    ties = 0
    for i in ids:
        hyps = [tables[m][i].hyp for m in models]
        edits = [tables[m][i].edits for m in models]
        right = [float(tables[m][i].correct) for m in models]
        top = vote(hyps)
        ties += len(top) > 1
        choices = {
            "best_single": best,
            "majority_vote": pick(top, rank, models),
            "weighted_vote": pick(vote(hyps, weights), rank, models),
            "best_single_test": best_test,
        }
        if weights_group:
            choices["weighted_vote_group"] = pick(vote(hyps, weights_group), rank, models)
        for name, k in choices.items():
            per[name]["edits"].append(edits[k])
            per[name]["right"].append(right[k])
        per["mean_of_models"]["edits"].append(float(np.mean(edits)))
        per["mean_of_models"]["right"].append(float(np.mean(right)))
        per["oracle"]["edits"].append(min(edits))
        per["oracle"]["right"].append(float(max(right)))
    ref = [tables[models[0]][i].ref_count for i in ids]
    per = {name: v for name, v in per.items() if v["edits"]}
    return {
        "held_out": held_out,
        "group": intelligibility_group(held_out),
        "teacher_set": teacher_set,
        "models": models,
        "ids": ids,
        "ref_words": ref,
        "per_utterance": per,
        "ties": ties,
        "teacher_accuracy": {m: {"accuracy": acc[m][0], "utterances": acc[m][1]} for m in models},
        "best_single": models[best],
        "best_single_test": models[best_test],
    }


def statistics(folds, n_boot=2000, n_perm=10000, seed=0):
    """WRA and WER with cluster-bootstrap intervals per fold and system; paired tests of each
    combination against the best single model chosen on the teachers, Holm-corrected over all."""
    tests = []
    for fold in folds:
        clusters = [production_of(i) for i in fold["ids"]]
        ref = np.array(fold["ref_words"], dtype=np.float64)
        fold["systems"] = {}
        for name, v in fold["per_utterance"].items():
            right, edits = np.array(v["right"]), np.array(v["edits"])
            wra = bootstrap_ci(right, np.ones_like(right), clusters, n_boot=n_boot, seed=seed)
            wer = bootstrap_ci(edits, ref, clusters, n_boot=n_boot, seed=seed)
            fold["systems"][name] = {"WRA": wra[0], "WRA_ci": list(wra[1:]), "WER": wer[0], "WER_ci": list(wer[1:])}
        reference = 1.0 - np.array(fold["per_utterance"]["best_single"]["right"])
        for name in COMBINATIONS[1:]:
            if name in fold["per_utterance"]:
                errors = 1.0 - np.array(fold["per_utterance"][name]["right"])
                test = paired_test(errors, reference, clusters, n_perm=n_perm, seed=seed)
                fold["systems"][name]["p"] = test["p_value"]
                fold["systems"][name]["dWRA"] = fold["systems"][name]["WRA"] - fold["systems"]["best_single"]["WRA"]
                tests.append((fold, name))
    for (fold, name), p in zip(tests, holm([fold["systems"][name]["p"] for fold, name in tests])):
        fold["systems"][name]["p_holm"] = p
    return folds


def _p(p):
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def tables(folds, n_boot, n_perm, notes):
    """The Markdown tables (one per teacher set) and their caption."""
    lines = []
    for teacher_set in TEACHER_SETS:
        header = ["held out", "models", *(LABELS[n] for n in COMBINATIONS + UPPER), "vote ties"]
        rows = []
        for fold in (f for f in folds if f["teacher_set"] == teacher_set):
            cells = [f"{fold['held_out']} ({fold['group'].replace('_', ' ')})", str(len(fold["models"]))]
            for name in COMBINATIONS + UPPER:
                s = fold["systems"].get(name)
                if s is None:
                    cells.append("–")
                    continue
                cell = f"{s['WRA']:.1f} [{s['WRA_ci'][0]:.1f}, {s['WRA_ci'][1]:.1f}]"
                if name == "best_single":
                    cell += f" ({fold['best_single']})"
                if name == "best_single_test":
                    cell += f" ({fold['best_single_test']})"
                if "p_holm" in s:
                    cell += f"; {s['dWRA']:+.1f}, p {_p(s['p_holm'])}"
                cells.append(cell)
            cells.append(str(fold["ties"]))
            rows.append(cells)
        lines += [f"**Teacher set `{teacher_set}`**", "", markdown_table(header, rows), ""]
    lines.append(
        "WRA % [95 % cluster-bootstrap CI over productions, "
        f"{n_boot} replicates]; for the combinations: ΔWRA against the best single model chosen on the "
        f"teacher speakers and the p of a paired sign-flip test ({n_perm} permutations) on per-utterance "
        "exactness, Holm-corrected over every test of both tables. ‡ upper bounds, not systems: the "
        "oracle counts an utterance right if any model is, and the test-chosen best single model was "
        "picked on the held-out speaker itself. Real data: the SA models' beam search + CTC + LM decodes "
        "(the SA project's cross-testing files), not this recipe's teacher-forced decodes."
    )
    if notes:
        lines += [
            "",
            "Files stored under another speaker's name (read by their utterance ids): " + "; ".join(notes) + ".",
        ]
    return "\n".join(lines) + "\n"


def run(folder, n_boot=2000, n_perm=10000, seed=0, folds=FOLDS):
    files, notes = read_cross_testing(folder)
    results = [combine_fold(files, h, t) for t in TEACHER_SETS for h in folds]
    statistics(results, n_boot=n_boot, n_perm=n_perm, seed=seed)
    return results, notes


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cross_testing", help="folder of <MODEL>/wer_<SPK>.txt files (the SA project's cross_testing)")
    parser.add_argument("--out", help="write word_fusion.json and word_fusion.md here")
    parser.add_argument("--n_boot", type=int, default=2000, help="bootstrap replicates (default 2000)")
    parser.add_argument("--n_perm", type=int, default=10000, help="sign-flip permutations (default 10000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and the permutations")
    args = parser.parse_args(argv)
    try:
        results, notes = run(args.cross_testing, n_boot=args.n_boot, n_perm=args.n_perm, seed=args.seed)
    except (OSError, ValueError) as err:
        parser.exit(2, f"ERROR: {err}\n")
    text = tables(results, args.n_boot, args.n_perm, notes)
    print(text, end="")
    if args.out:
        out = Path(args.out)
        summary = [
            {k: v for k, v in fold.items() if k not in ("per_utterance", "ids", "ref_words")} for fold in results
        ]
        write_json(
            out / "word_fusion.json",
            {
                "settings": {"n_boot": args.n_boot, "n_perm": args.n_perm, "seed": args.seed, "held_out": HELD_OUT},
                "notes": notes,
                "folds": summary,
            },
        )
        atomic_write(out / "word_fusion.md", lambda handle: handle.write(text))
        print(f"wrote {out / 'word_fusion.json'} and {out / 'word_fusion.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
