#!/usr/bin/env python3
"""Line several SpeechBrain ``wer_*.txt`` files up on the same utterances.

Reads any files written by ``ErrorRateStats.write_stats`` (the user's SpeechBrain results, this
recipe's ``wer_test*.txt``), checks each against its own header (``local/wer_files.py``), says how
each was made (the ``test_results.json`` beside a recipe output: synthetic or real data, how it was
decoded; a SpeechBrain file does not record its decoding), refuses to line synthetic data up with
real data, warns when the systems were decoded differently, and compares them on their shared
utterance ids: WER, SER and WRA with 95 % intervals (bootstrap over
(speaker, word) productions), the mean of the systems, the best single one, a word-level majority
vote and an oracle, paired tests against a reference system, and the utterances where the
systems disagree.

The vote follows the project's one rule (``local/combine.py``: ``VOTE_RULE``): a tie goes to the
hypothesis of the best-ranked system, ranked on data that is not the test. Which data, per system:
``--vote_rank NAME ...`` (the systems, best first), else the ``teacher_ranking`` a recipe run wrote
beside its ``teacher_<M>`` files (what ``train.py`` and ``decode.py`` vote with), else the system's
WRA on the other ``wer_*.txt`` files of its folder whose utterances are of other speakers (in the
SA project's ``cross_testing/<MODEL>/`` layout: the model's decodes of the other speakers, never
the compared speaker's, nor the model's own speaker's); a system without any ranks last, then
names decide. The output says which data ranked each system.

Usage (from recipes/UASpeech/logit_kd)::

    python compare.py WER_FILE... [--names N1 N2 ...] [--reference NAME] [--vote_rank NAME ...] [--json OUT]
                      [--n_perm N] [--n_boot N]
    python compare.py results/.../wer_test.txt /data/cross_testing/*/wer_M08.txt --json compare_M08.json
"""

import argparse
import collections
import json
import re
import sys
from pathlib import Path

from local import data_kind
from local.combine import ORACLE_RULE, VOTE_RULE, oracle, pick, rank_key, vote
from local.corpus import SPEAKERS, parse_utterance_id, production_of
from local.files import write_json
from local.scoring import rates
from local.significance import bootstrap_ci, paired_test
from local.tables import RULE, text_table
from local.wer_files import WerFile, read_exactness, read_wer_file

# ----------------------------------------------------------------------------- provenance

SPEECHBRAIN_DECODING = "not recorded in the file (the decoding of the SpeechBrain recipe that wrote it)"
_CTC_FILE = re.compile(r"^wer_test_ctc_(?P<decoder>[a-z_]+?)_(?P<system>.+)\.txt$")


def provenance(path):
    """What can be known of how a ``wer_*.txt`` file was made: ``{"synthetic", "decoding", "source"}``.

    A recipe output has a ``test_results.json`` beside it (whether its logits were the synthetic
    demo tree, and how each of its files was decoded); a file under a folder holding
    ``SYNTHETIC.json`` is synthetic; any other file is taken for a SpeechBrain result on real data,
    whose decoding the file does not record."""
    path = Path(path)
    results = path.parent / "test_results.json"
    if results.is_file():
        try:
            info = json.loads(results.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{results} (beside {path}) is unreadable: {err}") from None
        entry = info.get("wer_files", {}).get(path.name)
        if entry is not None:
            decoding = entry["decoding"]
        elif _CTC_FILE.match(path.name):
            decoding = f"free-running CTC ({_CTC_FILE.match(path.name)['decoder']}) of the audio"
        else:
            decoding = info.get("decoding", "unknown (no decoding in test_results.json)")
        kind = data_kind.of_info(info)
        origin = {
            "synthetic": kind != data_kind.REAL,
            "kind": kind,
            "decoding": decoding,
            "source": f"recipe output ({results})",
        }
        if info.get("partial"):
            origin["partial"] = info["partial"]
        system = (entry or {}).get("system", "")
        ranking = info.get("teacher_ranking") or {}
        if system.startswith("teacher_") and system[len("teacher_") :] in ranking:
            origin["ranking"] = ranking[system[len("teacher_") :]]
        return origin
    kind = data_kind.of_folder(path.parent)
    if kind == data_kind.DEMO:
        return {"synthetic": True, "kind": kind, "decoding": "unknown", "source": "a synthetic demo tree"}
    source = "a SpeechBrain wer file" + (" of the rehearsal corpus" if kind == data_kind.REHEARSAL else "")
    return {"synthetic": kind != data_kind.REAL, "kind": kind, "decoding": SPEECHBRAIN_DECODING, "source": source}


def demo_references(wf):
    """The number of utterances of a parsed wer file whose reference is the demo tree's made-up
    word for its word key (e.g. ``M08_B3_UW3_M5`` with the demo's pseudo-word): a file copied out
    of a demo run's folder, whose ``test_results.json`` no longer says it is synthetic."""
    from local.corpus import parse_utterance_id
    from local.synthetic import demo_word_keys

    demo = demo_word_keys()
    hits = 0
    for utt in wf.utterances:
        try:
            key = parse_utterance_id(utt.id)["word"]
        except ValueError:
            continue
        hits += key in demo and " ".join(utt.ref) == demo[key]
    return hits


def check_comparable(paths, origins):
    """Refuses synthetic and real data in one comparison (ValueError naming a file of each); returns
    the warnings: one when the systems were decoded differently."""
    kinds = {}
    for p, o in zip(paths, origins):
        kinds.setdefault(o.get("kind", data_kind.DEMO if o["synthetic"] else data_kind.REAL), []).append(p)
    if len(kinds) > 1 and data_kind.REAL not in kinds:
        (a, pa), (b, pb) = list(kinds.items())[:2]
        raise ValueError(
            f"refusing to compare {data_kind.LABELS[a]} ({pa[0]}) with {data_kind.LABELS[b]} ({pb[0]}): "
            "compare each kind on its own"
        )
    synthetic = [p for p, o in zip(paths, origins) if o["synthetic"]]
    real = [p for p, o in zip(paths, origins) if not o["synthetic"]]
    if synthetic and real:
        raise ValueError(
            f"refusing to compare SYNTHETIC with real data: {synthetic[0]} comes from the "
            f"{data_kind.LABELS[origins[paths.index(synthetic[0])]['kind']]} "
            f"({origins[paths.index(synthetic[0])]['source']}) but {real[0]} does not "
            f"({len(synthetic)} synthetic, {len(real)} real files): compare each kind on its own"
        )
    partial = [
        f"WARNING: {p} is a PARTIAL run ({o['partial']}): not the fold's figures"
        for p, o in zip(paths, origins)
        if o.get("partial")
    ]
    decodings = sorted({o["decoding"] for o in origins})
    if len(decodings) > 1:
        return partial + [
            "WARNING: these systems were decoded differently (" + "; ".join(decodings) + "): their "
            "differences mix the decoding with the model, and the vote and the oracle mix decodings"
        ]
    return partial


# ----------------------------------------------------------------------------- comparison


def default_names(paths):
    """``.../F02/wer_M08.txt`` -> ``F02/wer_M08``; longer path suffixes where those collide."""
    parts = [Path(p).with_suffix("").parts for p in paths]
    for depth in range(2, 1 + max((len(p) for p in parts), default=2)):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [f"{name}#{k}" for k, name in enumerate(str(p) for p in paths)]


def _resolve_reference(reference, names, paths):
    if isinstance(reference, int):
        if not -len(names) <= reference < len(names):
            raise ValueError(f"reference index {reference} out of range for {len(names)} systems")
        return reference % len(names)
    if reference in names:
        return names.index(reference)
    if reference in [str(p) for p in paths]:
        return [str(p) for p in paths].index(reference)
    if str(reference).lstrip("-").isdigit():
        return _resolve_reference(int(reference), names, paths)
    raise ValueError(f"reference {reference!r} is none of the systems {names}")


def _speakers(ids):
    """The UASpeech speakers of utterance ids (None when an id is not a UASpeech one)."""
    try:
        return {parse_utterance_id(i)["speaker"] for i in ids}
    except ValueError:
        return None


def other_files_accuracy(path, test_speakers):
    """A system's WRA on the other ``wer_*.txt`` files of its folder whose utterances are all of
    other speakers than ``test_speakers`` (and than the folder's own speaker, when the folder is
    named after one: in ``cross_testing/<MODEL>/`` the SA model's own speaker). Returns
    (``{"accuracy", "utterances", "files", "source"}`` or None when there are none, the notes on
    files that could not be read)."""
    path = Path(path)
    own = path.parent.name if path.parent.name in SPEAKERS else None
    right = n = files = 0
    notes = []
    for other in sorted(path.parent.glob("wer_*.txt")):
        if other.resolve() == path.resolve():
            continue
        try:
            read = read_exactness(other)
        except (OSError, UnicodeDecodeError, ValueError) as err:
            notes.append(f"not read for the vote's ranking: {err}")
            continue
        speakers = _speakers(read["ids"])
        if not read["ids"] or speakers is None or speakers & (set(test_speakers) | {own}):
            continue
        right, n, files = right + sum(read["right"]), n + len(read["ids"]), files + 1
    if not n:
        return None, notes
    source = f"WRA on {files} other speakers' files of its folder"
    return {"accuracy": right / n, "utterances": n, "files": files, "kind": "other_files", "source": source}, notes


def vote_ranking(paths, names, origins, shared, vote_rank=None):
    """Each system's ranking for the vote's tie-break (``combine.RANKING_RULE``): ``vote_rank`` (the
    names, best first), else the recipe run's ``teacher_ranking`` of a ``teacher_<M>`` file, else
    ``other_files_accuracy``. Returns (rank keys, {name: what ranked it}, notes)."""
    if vote_rank is not None:
        vote_rank = list(vote_rank)
        if sorted(vote_rank) != sorted(names):
            raise ValueError(
                f"--vote_rank must name every system once, best first: {' '.join(names)} (got {' '.join(vote_rank)})"
            )
        data = {n: {"position": vote_rank.index(n) + 1, "kind": "vote_rank", "source": "--vote_rank"} for n in names}
        return [rank_key(len(names) - vote_rank.index(n)) for n in names], data, []
    test_speakers = _speakers(shared) or set()
    keys, data, notes = [], {}, []
    for name, path, origin in zip(names, paths, origins):
        if "ranking" in origin:
            r = origin["ranking"]
            data[name] = {**r, "kind": "teacher_ranking", "source": f"teacher_ranking of {origin['source']}"}
            keys.append(rank_key(r["accuracy"], r.get("mean_logprob")))
            continue
        found, why = other_files_accuracy(path, test_speakers) if test_speakers else (None, [])
        notes += why
        data[name] = found or {"kind": "none", "source": "none: ranked last"}
        keys.append(rank_key(found and found["accuracy"]))
    unranked = [n for n in names if data[n]["kind"] == "none"]
    if unranked and len(unranked) < len(names):
        notes.append(
            f"no data to rank {', '.join(unranked)} for the vote's ties: ranked below the others (then by name); "
            f"give --vote_rank"
        )
    elif unranked:
        notes.append("no data to rank the systems for the vote's ties: ties go by name; give --vote_rank")
    if len({d["kind"] for n, d in data.items() if n not in unranked}) > 1:
        notes.append("the vote's ranking mixes kinds of data (see the rank column)")
    return keys, data, notes


def compare(files, names=None, reference=0, n_perm=10000, n_boot=2000, seed=0, vote_rank=None):
    """Line several ``wer_*.txt`` files (or parsed :class:`WerFile` objects) up.

    Utterances are matched by id; the analysis uses the ids present in every file (in the
    reference file's order), and the files must agree on the reference words of those ids.

    Returns a JSON-ready dict:

    * ``systems``: name -> ``n``, ``WER``, ``SER``, ``WRA`` (percent, the whole file), ``path``,
      and ``shared``: the same on the shared ids plus cluster-bootstrap 95 % intervals
      (``WER_ci``, ``WRA_ci``).
    * ``majority_vote`` and ``oracle``: ``n``, ``WER``, ``SER``, ``WRA`` on the shared ids,
      scored with ``speechbrain.utils.metric_stats.ErrorRateStats`` (rules in ``rule``).
    * ``paired_tests``: name -> ``{"WER": ..., "SER": ...}`` paired sign-flip tests of the system
      against the reference system on per-utterance edits and on per-utterance sentence error
      (0/1; the WRA test), clustered by speaker+word (``significance.paired_test``);
      ``mean_diff`` < 0 means fewer errors than the reference. The vote is tested too.
    * ``disagreements``: shared utterances whose hypotheses are not all equal, with each
      system's hypothesis (tokens joined by a space).
    """
    parsed = [f if isinstance(f, WerFile) else read_wer_file(f) for f in files]
    if not parsed:
        raise ValueError("no files to compare")
    paths = [p.path for p in parsed]
    origins = [provenance(p) for p in paths]
    for wf, origin in zip(parsed, origins):
        hits = 0 if origin["synthetic"] else demo_references(wf)
        if hits:
            origin.update(
                synthetic=True, kind=data_kind.DEMO, source=f"its references hold {hits} made-up words of the demo tree"
            )
    warnings = check_comparable(paths, origins)
    names = list(names) if names is not None else default_names(paths)
    if len(names) != len(parsed):
        raise ValueError(f"{len(names)} names for {len(parsed)} files")
    if len(set(names)) != len(names):
        raise ValueError(f"system names are not unique: {names}")
    ref_idx = _resolve_reference(reference, names, paths)

    tables = []
    for wf in parsed:
        table = wf.by_id()
        if len(table) != wf.n:
            dup = [k for k, v in collections.Counter(wf.ids).items() if v > 1]
            raise ValueError(f"{wf.path}: duplicate utterance ids, e.g. {dup[:3]}")
        tables.append(table)
    common = set(tables[0])
    for table in tables[1:]:
        common &= set(table)
    shared = [i for i in parsed[ref_idx].ids if i in common]
    if not shared:
        firsts = "; ".join(f"{wf.path}: {wf.n} utterances, e.g. {wf.ids[0] if wf.ids else '-'}" for wf in parsed)
        raise ValueError(f"the files share no utterance ids ({firsts})")
    for i in shared:
        refs = [tuple(t[i].ref) for t in tables]
        other = next((k for k, r in enumerate(refs) if r != refs[ref_idx]), None)
        if other is not None:
            raise ValueError(
                f"utterance {i} has the reference {' '.join(refs[ref_idx])!r} in {paths[ref_idx]} "
                f"({origins[ref_idx]['source']}) but {' '.join(refs[other])!r} in {paths[other]} "
                f"({origins[other]['source']}): these files are not of the same test"
            )
    groups = [production_of(i) for i in shared]

    def _edits(t):
        return [t[i].edits for i in shared]

    def _errs(t):
        return [int(t[i].edits > 0) for i in shared]

    systems = {}
    for name, wf, table, origin in zip(names, parsed, tables, origins):
        full = wf.metrics()
        utts = [table[i] for i in shared]
        part = wf.metrics(shared)
        part["WER_ci"] = list(
            bootstrap_ci([u.edits for u in utts], [u.ref_count for u in utts], groups, n_boot=n_boot, seed=seed)[1:]
        )
        part["WRA_ci"] = list(
            bootstrap_ci([int(u.correct) for u in utts], [1] * len(utts), groups, n_boot=n_boot, seed=seed)[1:]
        )
        systems[name] = {
            "path": wf.path,
            "synthetic": origin["synthetic"],
            "decoding": origin["decoding"],
            **{k: full[k] for k in ("n", "WER", "SER", "WRA", "edits", "ref_words", "erroneous")},
            "shared": part,
        }

    # The vote and the oracle take one system's hypothesis per utterance: its edits are that
    # system's edits (all files share the utterance's reference words). Vote ties go to the
    # best-ranked system (combine.VOTE_RULE), ranked on data that is not these utterances.
    rank, ranking, notes = vote_ranking(paths, names, origins, shared, vote_rank)
    ref_words = [tables[ref_idx][i].ref_count for i in shared]
    vote_edits, vote_right, oracle_edits, oracle_right, ties = [], [], [], 0, 0
    for i in shared:
        edits = [t[i].edits for t in tables]
        top = vote([t[i].hyp for t in tables])
        ties += len(top) > 1
        winner = pick(top, rank, names)
        vote_edits.append(edits[winner])
        vote_right.append(edits[winner] == 0)
        oracle_edits.append(oracle(edits))
        oracle_right += any(e == 0 for e in edits)
    vote_rates = rates(vote_edits, ref_words)
    vote_rates.update(rule=VOTE_RULE, ties=ties, ranking=ranking)
    if ties:  # (the ranking decides nothing without a tie)
        warnings += [f"WARNING: {note}" for note in notes]
    oracle_rates = rates(oracle_edits, ref_words)
    oracle_rates["WRA_any_right"] = 100.0 * oracle_right / len(shared)
    oracle_rates["rule"] = ORACLE_RULE

    ref_table = tables[ref_idx]
    tests = {}
    for name, table in zip(names, tables):
        if table is ref_table:
            continue
        tests[name] = {
            "WER": paired_test(_edits(table), _edits(ref_table), groups, n_perm=n_perm, seed=seed),
            "SER": paired_test(_errs(table), _errs(ref_table), groups, n_perm=n_perm, seed=seed),
        }
    # The vote tested as one more system against the reference.
    vote_tests = {
        "WER": paired_test(vote_edits, _edits(ref_table), groups, n_perm=n_perm, seed=seed),
        "SER": paired_test([int(not r) for r in vote_right], _errs(ref_table), groups, n_perm=n_perm, seed=seed),
    }

    disagreements = []
    for i in shared:
        hyps = [tuple(t[i].hyp) for t in tables]
        if len(set(hyps)) > 1:
            disagreements.append(
                {
                    "id": i,
                    "ref": " ".join(tables[ref_idx][i].ref),
                    "hyps": {name: " ".join(h) for name, h in zip(names, hyps)},
                }
            )

    # Two summaries of the systems themselves: their mean, and the best one (chosen on these very
    # utterances, so an optimistic figure for "the best single model").
    shared_rates = [systems[n]["shared"] for n in names]
    mean_of_systems = {k: sum(s[k] for s in shared_rates) / len(shared_rates) for k in ("WER", "SER", "WRA")}
    best = max(names, key=lambda n: (systems[n]["shared"]["WRA"], -systems[n]["shared"]["WER"]))
    best_single = {
        "name": best,
        **{k: systems[best]["shared"][k] for k in ("WER", "SER", "WRA")},
        "rule": "highest WRA on these very utterances (ties: lower WER): chosen on the test data, so an "
        "oracle-like upper figure, not a system one could pick in advance",
    }

    return {
        "reference": names[ref_idx],
        "names": names,
        "synthetic_data": origins[0]["synthetic"],
        "data_kind": origins[0]["kind"],
        "warnings": warnings,
        "n_shared": len(shared),
        "mean_of_systems": {"n_systems": len(names), **mean_of_systems},
        "best_single": best_single,
        "n_groups": len(set(groups)),
        "systems": systems,
        "majority_vote": {**vote_rates, "paired_test": vote_tests},
        "oracle": oracle_rates,
        "paired_tests": tests,
        "paired_test_settings": {
            "n_perm": n_perm,
            "seed": seed,
            "cluster": "speaker+word (utterance id without _<MIC>)",
        },
        "bootstrap_settings": {"n_boot": n_boot, "seed": seed, "level": 0.95},
        "disagreements": disagreements,
    }


def _rank_cell(data):
    """What ranked a system for the vote's ties, in a few words."""
    if data["kind"] == "vote_rank":
        return f"#{data['position']} (--vote_rank)"
    if data["kind"] == "none":
        return data["source"]
    if data["kind"] == "other_files":
        return f"{100 * data['accuracy']:.2f} % WRA on {data['files']} other speakers' files"
    return f"{100 * data['accuracy']:.2f} % on the run's training audio (teacher_ranking)"


def comparison_table(result):
    """The console table of :func:`compare`'s result."""

    def p_value(test):
        return f"{test['p_value']:.4f}" if test else "ref"

    def ci(values):
        return f"[{values[0]:5.2f}, {values[1]:6.2f}]"

    header = ["system", "n", "WER", "WER 95% CI", "SER", "WRA", "WRA 95% CI", "p(WER)", "p(WRA)"]
    rows = []
    for name in result["names"]:
        s = result["systems"][name]["shared"]
        test = result["paired_tests"].get(name)
        rows.append(
            [
                name,
                s["n"],
                f"{s['WER']:.2f}",
                ci(s["WER_ci"]),
                f"{s['SER']:.2f}",
                f"{s['WRA']:.2f}",
                ci(s["WRA_ci"]),
                p_value(test and test["WER"]),
                p_value(test and test["SER"]),
            ]
        )
    rows.append(RULE)
    v, o = result["majority_vote"], result["oracle"]
    m, b = result["mean_of_systems"], result["best_single"]
    rows.append(["mean of systems", "", f"{m['WER']:.2f}", "", f"{m['SER']:.2f}", f"{m['WRA']:.2f}"])
    rows.append(
        [
            "best single",
            "",
            f"{b['WER']:.2f}",
            "",
            f"{b['SER']:.2f}",
            f"{b['WRA']:.2f}",
        ]
    )
    rows.append(
        [
            "majority vote",
            v["n"],
            f"{v['WER']:.2f}",
            "",
            f"{v['SER']:.2f}",
            f"{v['WRA']:.2f}",
            "",
            p_value(v["paired_test"]["WER"]),
            p_value(v["paired_test"]["SER"]),
        ]
    )
    rows.append(
        ["oracle (any system right)", o["n"], f"{o['WER']:.2f}", "", f"{o['SER']:.2f}", f"{o['WRA_any_right']:.2f}"]
    )
    lines = list(result["warnings"])
    if result.get("data_kind") == data_kind.REHEARSAL:
        lines.append("REHEARSAL corpus: SYNTHETIC speech, real models: not UASpeech figures")
    elif result["synthetic_data"]:
        lines.append("SYNTHETIC data (the demo tree): these figures only show that the tools run")
    lines.append("how each system was decoded, and what ranks it for the vote's ties:")
    lines.append(
        text_table(
            ["system", "decoding", "vote rank"],
            [[n, result["systems"][n]["decoding"], _rank_cell(v["ranking"][n])] for n in result["names"]],
        )
    )
    lines += [
        f"utterances shared by all {len(result['names'])} files: {result['n_shared']} "
        f"({result['n_groups']} speaker+word groups); reference system: {result['reference']}",
        text_table(header, rows),
    ]
    full = [(n, s) for n, s in result["systems"].items() if s["n"] != s["shared"]["n"]]
    if full:
        lines.append("whole files (where they hold more than the shared utterances):")
        lines.append(
            text_table(
                ["system", "n", "WER", "SER", "WRA"],
                [[name, s["n"], f"{s['WER']:.2f}", f"{s['SER']:.2f}", f"{s['WRA']:.2f}"] for name, s in full],
            )
        )
    lines.append(f"best single: {b['name']}, chosen on these utterances (an upper bound, not a system)")
    lines.append(f"utterances where the systems disagree: {len(result['disagreements'])}")
    lines.append(
        "p: paired sign-flip test vs the reference, clustered by speaker+word "
        f"({result['paired_test_settings']['n_perm']} permutations); CI: cluster bootstrap; "
        f"majority vote: ties ({v['ties']} utterances) to the best-ranked system (vote rank above), then by name"
    )
    lines += result["warnings"]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", help="SpeechBrain wer_*.txt files")
    parser.add_argument(
        "--names", nargs="+", help="one display name per file (default: parent folder + file stem, e.g. F02/wer_M08)"
    )
    parser.add_argument(
        "--reference",
        default=None,
        help="name (or 0-based index) of the system the others are tested against (default: the first file)",
    )
    parser.add_argument(
        "--vote_rank",
        nargs="+",
        metavar="NAME",
        help="every system's name, best first: the ranking that breaks the vote's ties (default: each system's "
        "WRA on the other speakers' wer files of its folder, or a recipe run's teacher_ranking)",
    )
    parser.add_argument("--json", dest="json_out", help="write the full comparison as JSON here")
    parser.add_argument("--n_perm", type=int, default=10000, help="permutations of each paired test")
    parser.add_argument("--n_boot", type=int, default=2000, help="bootstrap resamples of each interval")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.json_out and Path(args.json_out).is_dir():
        parser.exit(2, f"ERROR: --json {args.json_out} is a folder: give the path of a .json file to write\n")
    try:
        result = compare(
            args.files,
            names=args.names,
            reference=0 if args.reference is None else args.reference,
            n_perm=args.n_perm,
            n_boot=args.n_boot,
            seed=args.seed,
            vote_rank=args.vote_rank,
        )
    except (OSError, ValueError) as err:
        parser.exit(2, f"ERROR: {err}\n")
    print(comparison_table(result))
    if args.json_out:
        try:
            write_json(args.json_out, result, indent=1)
        except OSError as err:
            parser.exit(2, f"ERROR: cannot write --json {args.json_out}: {err.strerror or err}\n")
        print(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
