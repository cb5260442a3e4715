"""SpeechBrain ``wer_*.txt`` files, read back and checked against their own headers.

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

:func:`read_wer_file` parses a file, reproduces its %WER / %SER from the per-utterance
alignments and checks them against the header (``ValueError`` on any mismatch).
"""

import collections
import re
from dataclasses import dataclass, field

from local.scoring import rates

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
    return rates([u.edits for u in utts], [u.ref_count for u in utts])


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
    ops = [ops_row[sum(widths[:k]) + 3 * k :][: widths[k]].strip() for k in range(len(widths))]
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
                if row[pos : pos + 3] != SEPARATOR:
                    _fail(path, row_no, f"row {row!r} has no {SEPARATOR!r} at column {pos}")
                pos += 3
            cells.append(row[pos : pos + width].strip())
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
        id=match["id"],
        ref=ref,
        hyp=hyp,
        ops=ops,
        insertions=ins,
        deletions=dels,
        substitutions=subs,
        edits=ins + dels + subs,
        ref_count=ref_count,
        wer=match["wer"],
        line=line_no,
    )
    own = (int(match["ins"]), int(match["del"]), int(match["sub"]), int(match["edits"]), int(match["ref"]))
    if own != (ins, dels, subs, utt.edits, ref_count):
        _fail(
            path,
            line_no,
            f"utterance line says ins/del/sub/edits/ref = {own}, its alignment gives "
            f"{(ins, dels, subs, utt.edits, ref_count)}",
        )
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
    m_wer, m_ser, m_scored = (
        _SUMMARY_WER.match(lines[0]),
        _SUMMARY_SER.match(lines[1]),
        _SUMMARY_SCORED.match(lines[2]),
    )
    for line_no, (m, what) in enumerate(
        (
            (m_wer, "%WER [ e / n, i ins, d del, s sub ]"),
            (m_ser, "%SER [ k / n ]"),
            (m_scored, "Scored N sentences, M not present in hyp."),
        ),
        start=1,
    ):
        if m is None:
            _fail(path, line_no, f"expected {what!r}, got {lines[line_no - 1]!r}")
    result = WerFile(
        path=path,
        wer=m_wer["wer"],
        ser=m_ser["ser"],
        edits=int(m_wer["edits"]),
        ref_tokens=int(m_wer["ref"]),
        insertions=int(m_wer["ins"]),
        deletions=int(m_wer["del"]),
        substitutions=int(m_wer["sub"]),
        erroneous=int(m_ser["err"]),
        n_sentences=int(m_scored["n"]),
        n_absent=int(m_scored["absent"]),
        partial=bool(m_wer["partial"]),
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
        ("reference words", result.ref_tokens, got["ref_words"]),
        ("insertions", result.insertions, sum(u.insertions for u in result.utterances)),
        ("deletions", result.deletions, sum(u.deletions for u in result.utterances)),
        ("substitutions", result.substitutions, sum(u.substitutions for u in result.utterances)),
        ("erroneous sentences", result.erroneous, got["erroneous"]),
        ("scored sentences (%SER line)", int(m_ser["n"]), n),
        ("scored sentences (Scored line)", result.n_sentences, n),
    ]
    result.mismatches = [
        f"header {what} = {said}, alignments give {found}" for what, said, found in checks if str(said) != str(found)
    ]
    if check and result.mismatches:
        raise WerFileMismatch(f"{path}: header disagrees with the alignments: " + "; ".join(result.mismatches))
    return result


def read_exactness(path):
    """``{"ids": [...], "right": [bool, ...]}`` of a ``wer_*.txt`` file, read from its utterance lines
    only (each line's edit count; the alignments are not parsed): what ranking a system on other
    data needs, for many files at once. The counts are checked against the file's own ``%SER`` line
    (``ValueError`` naming the file otherwise)."""
    path = str(path)
    with open(path, encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    m_ser = _SUMMARY_SER.match(lines[1]) if len(lines) > 2 else None
    if _SUMMARY_WER.match(lines[0]) is None or m_ser is None:
        _fail(path, 1, "not a SpeechBrain WER summary (%WER and %SER lines)")
    ids, right = [], []
    # blocks of 5 lines after the header and the format example: rule, utterance line, 3 rows
    for i in range(12, len(lines), 5):
        match = _UTT_HEADER.match(lines[i])
        if lines[i - 1] != _RULE or match is None:
            _fail(path, i + 1, f"expected '<id>, %WER ...' after a rule line, got {lines[i]!r}")
        ids.append(match["id"])
        right.append(int(match["edits"]) == 0)
    if len(ids) != int(m_ser["n"]) or right.count(False) != int(m_ser["err"]):
        _fail(
            path,
            2,
            f"the %SER line says {m_ser['err']} / {m_ser['n']}, the utterance lines give "
            f"{right.count(False)} / {len(ids)}",
        )
    return {"ids": ids, "right": right}
