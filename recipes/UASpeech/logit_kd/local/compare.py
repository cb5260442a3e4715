#!/usr/bin/env python3
"""Read SpeechBrain ``wer_*.txt`` files and line several systems up on the same utterances.

A ``wer_*.txt`` file is what ``speechbrain.utils.metric_stats.ErrorRateStats.write_stats``
writes (``speechbrain.dataio.wer.print_wer_summary`` + ``print_alignments``)::

    %WER 12.44 [ 222 / 1785, 12 ins, 0 del, 210 sub ]        (" [PARTIAL]" may follow)
    %SER 12.16 [ 217 / 1785 ]
    Scored 1785 sentences, 0 not present in hyp.
    ================================================================================
    ALIGNMENTS
    <blank>
    Format:
    <utterance-id>, WER DETAILS
    <three rows of an example alignment>
    ================================================================================
    M08_B3_CW95_M2, %WER 0.00 [ 0 / 1, 0 ins, 0 del, 0 sub ]
    COME                  <- reference row
     =                    <- ops row: = I D S
    COME                  <- hypothesis row
    ================================================================================
    ...

In the three rows every aligned position is one cell, ``str(token).center(width)`` with the
same width in all three rows, joined by ``" ; "``. ``<eps>`` stands for "nothing" (in the
reference row at an insertion, in the hypothesis row at a deletion); an empty-string token
prints as a blank cell. The rows are therefore parsed *by column position* taken from the ops
row, which keeps tokens that contain spaces (e.g. one hypothesis token ``"AND ⁇ OF"``) and
empty tokens intact.

Library:

* :func:`read_wer_file` -- parse a file, reproduce its %WER / %SER from the per-utterance
  alignments and check them against the header (``ValueError`` on any mismatch).
* :func:`compare` -- line files up on their shared utterance ids: per-system metrics, a
  majority vote and an oracle (both scored with SpeechBrain's ``ErrorRateStats``), paired
  randomization tests against a reference system (clustered by speaker+word, see
  ``significance.py``) and the utterances on which the systems disagree.

CLI::

    python recipes/UASpeech/logit_kd/local/compare.py WER_FILE... \\
        [--names N1 N2 ...] [--reference NAME] [--json OUT]
"""

import argparse
import collections
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

try:
    from local.files import write_json
    from local.significance import bootstrap_ci, group_of, paired_test
except ImportError:  # run as a script: put the recipe folder (parent of local/) on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from local.files import write_json
    from local.significance import bootstrap_ci, group_of, paired_test

EMPTY_SYMBOL = "<eps>"
SEPARATOR = " ; "
OPS = {"=": "eq", "I": "ins", "D": "del", "S": "sub"}

_SUMMARY_WER = re.compile(
    r"^%WER (?P<wer>\S+) \[ (?P<edits>\d+) / (?P<ref>\d+), (?P<ins>\d+) ins, "
    r"(?P<del>\d+) del, (?P<sub>\d+) sub \](?P<partial> \[PARTIAL\])?$"
)
_SUMMARY_SER = re.compile(r"^%SER (?P<ser>\S+) \[ (?P<err>\d+) / (?P<n>\d+) \]$")
_SUMMARY_SCORED = re.compile(r"^Scored (?P<n>\d+) sentences, (?P<absent>\d+) not present in hyp\.$")
_UTT_HEADER = re.compile(
    r"^(?P<id>.+), %WER (?P<wer>\S+) \[ (?P<edits>\d+) / (?P<ref>\d+), (?P<ins>\d+) ins, "
    r"(?P<del>\d+) del, (?P<sub>\d+) sub \]$"
)
_RULE = "=" * 80

VOTE_TIE_BREAK = (
    "majority vote over whole hypothesis strings (token sequences); a tie between equally "
    "frequent hypotheses goes to the one produced by the earliest system in the given order"
)
ORACLE_RULE = (
    "per utterance the hypothesis of the system with the fewest edits (ties: earliest system "
    "in the given order); WRA oracle = utterance counted right if any system is exactly right"
)


class WerFileMismatch(ValueError):
    """The numbers reproduced from a file's alignments disagree with its own header lines."""


@dataclass
class Utterance:
    """One scored utterance of a ``wer_*.txt`` file."""

    id: str
    ref: list  # reference tokens, <eps> removed
    hyp: list  # hypothesis tokens, <eps> removed; empty-string tokens kept as ""
    ops: list  # one of "=", "I", "D", "S" per aligned position
    insertions: int
    deletions: int
    substitutions: int
    edits: int
    ref_count: int  # reference words as SpeechBrain counts them (the utterance's "/ N")
    wer: str  # the utterance's printed %WER, e.g. "100.00"
    line: int  # 1-based line number of the utterance's header line

    @property
    def correct(self):
        """Exactly right (no edit): what word recognition accuracy counts."""
        return self.edits == 0


@dataclass
class WerFile:
    """A parsed ``wer_*.txt`` file: its header numbers and its utterances."""

    path: str
    wer: str  # printed, e.g. "12.44"
    ser: str
    edits: int
    ref_tokens: int
    insertions: int
    deletions: int
    substitutions: int
    erroneous: int  # utterances with at least one edit (the "%SER [ k / n ]" k)
    n_sentences: int  # scored sentences
    n_absent: int  # "not present in hyp"
    partial: bool
    utterances: list = field(default_factory=list)
    mismatches: list = field(default_factory=list)  # empty when everything reproduces

    @property
    def n(self):
        return len(self.utterances)

    @property
    def ids(self):
        return [u.id for u in self.utterances]

    def by_id(self):
        return {u.id: u for u in self.utterances}

    def metrics(self, ids=None):
        """n, WER, SER, WRA (percent) reproduced from the utterances (all, or the given ids)."""
        utts = self.utterances if ids is None else [self.by_id()[i] for i in ids]
        return _metrics(utts)


def _metrics(utts):
    n = len(utts)
    edits = sum(u.edits for u in utts)
    ref = sum(u.ref_count for u in utts)
    wrong = sum(1 for u in utts if u.edits > 0)
    ser = 100.0 * wrong / n if n else float("nan")
    return {
        "n": n,
        "WER": 100.0 * edits / ref if ref else 0.0,  # SpeechBrain's convention for 0 ref words
        "SER": ser,
        "WRA": 100.0 - ser,
        "edits": edits,
        "ref_tokens": ref,
        "erroneous": wrong,
    }


def _fail(path, line_no, message):
    raise ValueError(f"{path}:{line_no}: {message}")


def _cells(path, line_no, ops_row, rows):
    """Split the three alignment rows into cells using the column layout of the ops row.

    In every cell the longest of its three strings fills the cell, so the longest row has the
    full width even when trailing blanks were stripped (by an editor); shorter rows that end in
    a non-blank are padded back to it.
    """
    total = max(len(ops_row), *(len(r) for r in rows))
    if len(ops_row) < total and ops_row == ops_row.rstrip():
        ops_row = ops_row.ljust(total)
    if ops_row == "":
        widths = []
    else:
        pieces = ops_row.split(";")
        widths = []
        for k, piece in enumerate(pieces):
            left = 1 if k > 0 else 0
            right = 1 if k < len(pieces) - 1 else 0
            if (left and not piece.startswith(" ")) or (right and not piece.endswith(" ")):
                _fail(path, line_no, f"ops row {ops_row!r} is not cells joined by {SEPARATOR!r}")
            widths.append(len(piece) - left - right)
    ops = [ops_row[sum(widths[:k]) + 3 * k:][: widths[k]].strip() for k in range(len(widths))]
    for op in ops:
        if op not in OPS:
            _fail(path, line_no, f"unknown edit symbol {op!r} in ops row {ops_row!r}")
    total = sum(widths) + 3 * max(0, len(widths) - 1)
    out = []
    for row_no, row in zip((line_no - 1, line_no + 1), rows):
        if len(row) < total and row == row.rstrip():
            row = row.ljust(total)  # trailing blanks lost (e.g. by an editor)
        if len(row) != total:
            _fail(path, row_no, f"row {row!r} does not line up with ops row {ops_row!r}")
        cells, pos = [], 0
        for k, width in enumerate(widths):
            if k > 0:
                if row[pos:pos + 3] != SEPARATOR:
                    _fail(path, row_no, f"row {row!r} has no {SEPARATOR!r} at column {pos}")
                pos += 3
            cells.append(row[pos:pos + width].strip())
            pos += width
        out.append(cells)
    return ops, out[0], out[1]


def _parse_utterance(path, lines, i):
    """Parse the block whose header line is lines[i]; return the Utterance."""
    line_no = i + 1
    match = _UTT_HEADER.match(lines[i])
    if match is None:
        _fail(path, line_no, f"expected '<id>, %WER ...' utterance line, got {lines[i]!r}")
    if i + 3 >= len(lines):
        _fail(path, line_no, "file ends inside an alignment block")
    ref_row, ops_row, hyp_row = lines[i + 1], lines[i + 2], lines[i + 3]
    ops, ref_cells, hyp_cells = _cells(path, line_no + 2, ops_row, (ref_row, hyp_row))
    ref, hyp = [], []
    for op, r, h in zip(ops, ref_cells, hyp_cells):
        if op == "I":
            if r != EMPTY_SYMBOL:
                _fail(path, line_no + 1, f"insertion aligned to reference token {r!r}, not {EMPTY_SYMBOL}")
            hyp.append(h)
        elif op == "D":
            if h != EMPTY_SYMBOL:
                _fail(path, line_no + 3, f"deletion aligned to hypothesis token {h!r}, not {EMPTY_SYMBOL}")
            ref.append(r)
        else:
            if (op == "=") != (r == h):
                _fail(path, line_no + 2, f"op {op!r} between {r!r} and {h!r}")
            ref.append(r)
            hyp.append(h)
    count = collections.Counter(ops)
    ins, dels, subs = count["I"], count["D"], count["S"]
    # SpeechBrain counts 0 reference words when the reference is empty or starts with "".
    ref_count = 0 if (not ref or ref[0] == "") else len(ref)
    utt = Utterance(
        id=match["id"], ref=ref, hyp=hyp, ops=ops, insertions=ins, deletions=dels,
        substitutions=subs, edits=ins + dels + subs, ref_count=ref_count, wer=match["wer"],
        line=line_no,
    )
    own = (int(match["ins"]), int(match["del"]), int(match["sub"]), int(match["edits"]), int(match["ref"]))
    if own != (ins, dels, subs, utt.edits, ref_count):
        _fail(path, line_no, f"utterance line says ins/del/sub/edits/ref = {own}, its alignment gives "
                             f"{(ins, dels, subs, utt.edits, ref_count)}")
    if f"{100.0 * utt.edits / max(1, ref_count):.2f}" != match["wer"]:
        _fail(path, line_no, f"utterance %WER {match['wer']} does not match {utt.edits}/{ref_count}")
    return utt


def read_wer_file(path, check=True):
    """Parse a SpeechBrain ``ErrorRateStats.write_stats`` file.

    Every utterance's I/D/S counts are recounted from its ops row and must equal its own
    ``<id>, %WER ...`` line (``ValueError`` naming file and line otherwise). Then the corpus
    numbers are reproduced -- WER = 100 * sum(edits) / sum(ref words), SER = 100 *
    #(edits > 0) / n, the ins/del/sub totals and the sentence count -- and compared with the
    header, as printed (2 decimals) and as integers. With ``check=True`` any disagreement raises
    :class:`WerFileMismatch` (a ``ValueError``); with ``check=False`` it is listed in
    ``result.mismatches``.
    """
    path = str(path)
    with open(path, encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) < 3:
        _fail(path, len(lines) + 1, "too short for a WER summary (3 lines)")
    m_wer, m_ser, m_scored = (_SUMMARY_WER.match(lines[0]), _SUMMARY_SER.match(lines[1]),
                              _SUMMARY_SCORED.match(lines[2]))
    for line_no, (m, what) in enumerate(
        ((m_wer, "%WER [ e / n, i ins, d del, s sub ]"), (m_ser, "%SER [ k / n ]"),
         (m_scored, "Scored N sentences, M not present in hyp.")), start=1):
        if m is None:
            _fail(path, line_no, f"expected {what!r}, got {lines[line_no - 1]!r}")
    result = WerFile(
        path=path, wer=m_wer["wer"], ser=m_ser["ser"], edits=int(m_wer["edits"]),
        ref_tokens=int(m_wer["ref"]), insertions=int(m_wer["ins"]), deletions=int(m_wer["del"]),
        substitutions=int(m_wer["sub"]), erroneous=int(m_ser["err"]), n_sentences=int(m_scored["n"]),
        n_absent=int(m_scored["absent"]), partial=bool(m_wer["partial"]),
    )
    # Global alignment header: rule, ALIGNMENTS, blank, Format:, <utterance-id>..., 3 example rows.
    expected = [_RULE, "ALIGNMENTS", "", "Format:", "<utterance-id>, WER DETAILS"]
    if len(lines) > 3:
        for k, want in enumerate(expected):
            got = lines[3 + k] if 3 + k < len(lines) else None
            if got != want:
                _fail(path, 4 + k, f"expected {want!r}, got {got!r}")
        i = 3 + len(expected) + 3
        if i > len(lines):
            _fail(path, len(lines), "file ends inside the format example")
        while i < len(lines):
            if lines[i] != _RULE:
                _fail(path, i + 1, f"expected a line of 80 '=', got {lines[i]!r}")
            if i + 4 >= len(lines):
                _fail(path, i + 1, "file ends inside an alignment block")
            result.utterances.append(_parse_utterance(path, lines, i + 1))
            i += 5

    got = _metrics(result.utterances)
    n = len(result.utterances)
    checks = [
        ("%WER", result.wer, f"{got['WER']:.2f}"),
        ("%SER", result.ser, f"{got['SER']:.2f}" if n else "n/a"),
        ("edits", result.edits, got["edits"]),
        ("reference words", result.ref_tokens, got["ref_tokens"]),
        ("insertions", result.insertions, sum(u.insertions for u in result.utterances)),
        ("deletions", result.deletions, sum(u.deletions for u in result.utterances)),
        ("substitutions", result.substitutions, sum(u.substitutions for u in result.utterances)),
        ("erroneous sentences", result.erroneous, got["erroneous"]),
        ("scored sentences (%SER line)", int(m_ser["n"]), n),
        ("scored sentences (Scored line)", result.n_sentences, n),
    ]
    result.mismatches = [f"header {what} = {said}, alignments give {found}"
                         for what, said, found in checks if str(said) != str(found)]
    if check and result.mismatches:
        raise WerFileMismatch(f"{path}: header disagrees with the alignments: "
                              + "; ".join(result.mismatches))
    return result


# ----------------------------------------------------------------------------- comparison


def default_names(paths):
    """``.../F02/wer_M08.txt`` -> ``F02/wer_M08``; longer path suffixes where those collide."""
    parts = [Path(p).with_suffix("").parts for p in paths]
    for depth in range(2, 1 + max((len(p) for p in parts), default=2)):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [f"{name}#{k}" for k, name in enumerate(str(p) for p in paths)]


def _score_sb(ids, hyps, refs):
    """Score hypotheses with SpeechBrain's own ErrorRateStats (hypothesis first)."""
    from speechbrain.utils.metric_stats import ErrorRateStats

    stats = ErrorRateStats()
    stats.append(list(ids), [list(h) for h in hyps], [list(r) for r in refs])
    summary = stats.summarize()
    return {
        "n": summary["num_scored_sents"],
        "WER": summary["WER"],
        "SER": summary["SER"],
        "WRA": 100.0 - summary["SER"],
        "edits": summary["num_edits"],
        "ref_tokens": summary["num_scored_tokens"],
        "erroneous": summary["num_erroneous_sents"],
    }


def majority_vote(hyps_per_system):
    """Index of the system whose hypothesis wins the vote for one utterance.

    ``hyps_per_system``: one token list per system, in the given system order. Whole
    hypotheses are compared; the most frequent wins; among equally frequent hypotheses the
    one first produced by the earliest system wins.
    """
    keys = [tuple(h) for h in hyps_per_system]
    counts = collections.Counter(keys)
    best = max(counts.values())
    for k, key in enumerate(keys):
        if counts[key] == best:
            return k
    raise ValueError("no hypotheses to vote on")


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


def compare(files, names=None, reference=0, n_perm=10000, n_boot=2000, seed=0):
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
    names = list(names) if names is not None else default_names(paths)
    if len(names) != len(parsed):
        raise ValueError(f"{len(names)} names for {len(parsed)} files")
    if len(set(names)) != len(names):
        raise ValueError(f"system names are not unique: {names}")
    ref_idx = _resolve_reference(reference, names, paths)

    tables = []
    for name, wf in zip(names, parsed):
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
        raise ValueError("the files share no utterance ids")
    for i in shared:
        refs = {tuple(t[i].ref) for t in tables}
        if len(refs) > 1:
            raise ValueError(f"utterance {i} has different references across the files: {sorted(refs)}")
    groups = [group_of(i) for i in shared]

    def _edits(t):
        return [t[i].edits for i in shared]

    def _errs(t):
        return [int(t[i].edits > 0) for i in shared]

    systems = {}
    for name, wf, table in zip(names, parsed, tables):
        full = wf.metrics()
        utts = [table[i] for i in shared]
        part = _metrics(utts)
        part["WER_ci"] = list(bootstrap_ci([u.edits for u in utts], [u.ref_count for u in utts],
                                           groups, n_boot=n_boot, seed=seed)[1:])
        part["WRA_ci"] = list(bootstrap_ci([int(u.correct) for u in utts], [1] * len(utts),
                                           groups, n_boot=n_boot, seed=seed)[1:])
        systems[name] = {"path": wf.path, **{k: full[k] for k in ("n", "WER", "SER", "WRA", "edits",
                                                                  "ref_tokens", "erroneous")},
                         "shared": part}

    refs = [tables[ref_idx][i].ref for i in shared]
    vote_hyps, vote_edits, oracle_hyps, oracle_right = [], [], [], 0
    vote_winner = collections.Counter()
    for i in shared:
        hyps = [t[i].hyp for t in tables]
        k = majority_vote(hyps)
        vote_winner[names[k]] += 1
        vote_hyps.append(hyps[k])
        vote_edits.append(tables[k][i].edits)  # same ref + hyp as system k: same edit count
        edits = [t[i].edits for t in tables]
        oracle_hyps.append(hyps[edits.index(min(edits))])
        oracle_right += any(e == 0 for e in edits)
    vote = _score_sb(shared, vote_hyps, refs)
    vote["rule"] = VOTE_TIE_BREAK
    oracle = _score_sb(shared, oracle_hyps, refs)
    oracle["WRA_any_right"] = 100.0 * oracle_right / len(shared)
    oracle["rule"] = ORACLE_RULE

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
        "SER": paired_test([int(e > 0) for e in vote_edits], _errs(ref_table), groups,
                           n_perm=n_perm, seed=seed),
    }

    disagreements = []
    for i in shared:
        hyps = [tuple(t[i].hyp) for t in tables]
        if len(set(hyps)) > 1:
            disagreements.append({
                "id": i,
                "ref": " ".join(tables[ref_idx][i].ref),
                "hyps": {name: " ".join(h) for name, h in zip(names, hyps)},
            })

    # Two summaries of the systems themselves: their mean, and the best one (chosen on these very
    # utterances, so an optimistic figure for "the best single model").
    shared_rates = [systems[n]["shared"] for n in names]
    mean_of_systems = {k: sum(s[k] for s in shared_rates) / len(shared_rates) for k in ("WER", "SER", "WRA")}
    best = max(names, key=lambda n: (systems[n]["shared"]["WRA"], -systems[n]["shared"]["WER"]))
    best_single = {"name": best, **{k: systems[best]["shared"][k] for k in ("WER", "SER", "WRA")},
                   "rule": "highest WRA on the shared utterances (ties: lower WER): chosen on the test data"}

    return {
        "reference": names[ref_idx],
        "names": names,
        "n_shared": len(shared),
        "mean_of_systems": {"n_systems": len(names), **mean_of_systems},
        "best_single": best_single,
        "n_groups": len(set(groups)),
        "systems": systems,
        "majority_vote": {**vote, "winner_counts": dict(vote_winner), "paired_test": vote_tests},
        "oracle": oracle,
        "paired_tests": tests,
        "paired_test_settings": {"n_perm": n_perm, "seed": seed,
                                 "cluster": "speaker+word (utterance id without _<MIC>)"},
        "bootstrap_settings": {"n_boot": n_boot, "seed": seed, "level": 0.95},
        "disagreements": disagreements,
    }


def format_table(result):
    """A readable text table of :func:`compare`'s result."""
    ref = result["reference"]
    width = max([len(n) for n in result["names"]] + [len("mean of systems"), len("system")])
    head = (f"{'system':<{width}}  {'n':>5}  {'WER':>6}  {'WER 95% CI':>15}  {'SER':>6}  {'WRA':>6}  "
            f"{'WRA 95% CI':>15}  {'p(WER)':>7}  {'p(WRA)':>7}")
    lines = [f"utterances shared by all {len(result['names'])} files: {result['n_shared']} "
             f"({result['n_groups']} speaker+word groups); reference system: {ref}", head,
             "-" * len(head)]

    def _p(test):
        return f"{test['p_value']:7.4f}" if test else f"{'ref':>7}"

    for name in result["names"]:
        s = result["systems"][name]["shared"]
        test = result["paired_tests"].get(name, {})
        lines.append(
            f"{name:<{width}}  {s['n']:>5}  {s['WER']:6.2f}  [{s['WER_ci'][0]:5.2f}, {s['WER_ci'][1]:6.2f}]  "
            f"{s['SER']:6.2f}  {s['WRA']:6.2f}  [{s['WRA_ci'][0]:5.2f}, {s['WRA_ci'][1]:6.2f}]  "
            f"{_p(test.get('WER')) if test else _p(None)}  {_p(test.get('SER')) if test else _p(None)}")
    lines.append("-" * len(head))
    v, o = result["majority_vote"], result["oracle"]
    m, b = result["mean_of_systems"], result["best_single"]
    lines.append(f"{'mean of systems':<{width}}  {'':>5}  {m['WER']:6.2f}  {'':>15}  {m['SER']:6.2f}  {m['WRA']:6.2f}")
    lines.append(f"{'best single':<{width}}  {'':>5}  {b['WER']:6.2f}  {'':>15}  {b['SER']:6.2f}  {b['WRA']:6.2f}"
                 f"  ({b['name']}, chosen on these utterances)")
    lines.append(f"{'majority vote':<{width}}  {v['n']:>5}  {v['WER']:6.2f}  {'':>15}  {v['SER']:6.2f}  "
                 f"{v['WRA']:6.2f}  {'':>15}  {_p(v['paired_test']['WER'])}  {_p(v['paired_test']['SER'])}")
    lines.append(f"{'oracle':<{width}}  {o['n']:>5}  {o['WER']:6.2f}  {'':>15}  {o['SER']:6.2f}  "
                 f"{o['WRA_any_right']:6.2f}")
    full = [(n, s) for n, s in result["systems"].items() if s["n"] != s["shared"]["n"]]
    if full:
        lines.append("whole files (where they hold more than the shared utterances):")
        for name, s in full:
            lines.append(f"  {name:<{width}}  {s['n']:>5}  WER {s['WER']:6.2f}  SER {s['SER']:6.2f}  "
                         f"WRA {s['WRA']:6.2f}")
    lines.append(f"utterances where the systems disagree: {len(result['disagreements'])}")
    lines.append("p: paired sign-flip test vs the reference, clustered by speaker+word "
                 f"({result['paired_test_settings']['n_perm']} permutations); CI: cluster bootstrap; "
                 "vote ties go to the earliest system given")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", help="SpeechBrain wer_*.txt files")
    parser.add_argument("--names", nargs="+", help="one display name per file "
                        "(default: parent folder + file stem, e.g. F02/wer_M08)")
    parser.add_argument("--reference", default=None,
                        help="name (or 0-based index) of the system the others are tested "
                             "against (default: the first file)")
    parser.add_argument("--json", dest="json_out", help="write the full comparison as JSON here")
    parser.add_argument("--n-perm", type=int, default=10000)
    parser.add_argument("--n-boot", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        result = compare(args.files, names=args.names,
                         reference=0 if args.reference is None else args.reference,
                         n_perm=args.n_perm, n_boot=args.n_boot, seed=args.seed)
    except (OSError, ValueError) as err:
        parser.exit(2, f"error: {err}\n")
    print(format_table(result))
    if args.json_out:
        write_json(args.json_out, result, indent=1)
        print(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
