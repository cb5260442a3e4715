"""Tests of compare.py and local/wer_files.py: parsing SpeechBrain wer_*.txt files and lining systems up."""

import json
import re
import subprocess
import sys

import pytest

from local.combine import pick, rank_key, vote
from local.wer_files import WerFileMismatch, read_wer_file

from compare import compare
from conftest import RECIPE

SCRIPT = RECIPE / "compare.py"


def edit_distance(ref, hyp):
    """Plain Levenshtein distance between two token lists (independent of SpeechBrain)."""
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i]
        for j, h in enumerate(hyp, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h)))
        prev = cur
    return prev[-1]


def header_numbers(path):
    """The first two lines of a wer file, read independently of compare.py."""
    with open(path, encoding="utf-8") as handle:
        wer_line, ser_line = handle.readline(), handle.readline()
    w = re.match(r"%WER (\S+) \[ (\d+) / (\d+),", wer_line)
    s = re.match(r"%SER (\S+) \[ (\d+) / (\d+) \]", ser_line)
    return {"WER": w[1], "edits": int(w[2]), "ref": int(w[3]), "SER": s[1], "wrong": int(s[2]), "n": int(s[3])}


def write_sb_file(path, rows):
    """Write a wer file with SpeechBrain's own ErrorRateStats; rows: (id, ref, hyp)."""
    from speechbrain.utils.metric_stats import ErrorRateStats

    stats = ErrorRateStats()
    # two append calls, as a training loop would do batch by batch
    half = max(1, len(rows) // 2)
    for batch in (rows[:half], rows[half:]):
        if batch:
            stats.append([r[0] for r in batch], [r[2] for r in batch], [r[1] for r in batch])
    with open(path, "w", encoding="utf-8") as handle:
        stats.write_stats(handle)
    return stats


@pytest.fixture(scope="module")
def real_files(shared_uaspeech):
    files = sorted((shared_uaspeech / "cross_testing").glob("*/wer_*.txt"))
    return files


def test_all_real_files_reproduce_their_headers(real_files):
    # every SA model on every other speaker (15 x 14), F02 on M11 missing
    assert len(real_files) == 209
    for path in real_files:
        head = header_numbers(path)
        parsed = read_wer_file(path)
        utts = parsed.utterances
        assert len(utts) == head["n"], path
        # recount from the ops rows and from the tokens, independently of the module's sums
        edits = sum(u.ops.count("I") + u.ops.count("D") + u.ops.count("S") for u in utts)
        ref_words = sum(len(u.ref) for u in utts)
        wrong = sum(1 for u in utts if edit_distance(u.ref, u.hyp) > 0)
        assert sum(edit_distance(u.ref, u.hyp) for u in utts) == edits == head["edits"], path
        assert ref_words == head["ref"], path
        assert wrong == head["wrong"], path
        assert f"{100.0 * edits / ref_words:.2f}" == head["WER"], path
        assert f"{100.0 * wrong / len(utts):.2f}" == head["SER"], path
        assert parsed.wer == head["WER"] and parsed.ser == head["SER"]
        metrics = parsed.metrics()
        assert f"{metrics['WER']:.2f}" == head["WER"] and f"{metrics['SER']:.2f}" == head["SER"]
        assert metrics["WRA"] == pytest.approx(100.0 - metrics["SER"])
        assert not parsed.mismatches
        assert all(re.fullmatch(r"[FM]\d\d_B3_[A-Z]+\d*_M[2-8]", u.id) for u in utts), path


def test_real_file_first_utterance_by_hand(real_files):
    path = next(p for p in real_files if p.parent.name == "F02" and p.stem == "wer_M08")
    with open(path, encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    first = read_wer_file(path).utterances[0]
    assert lines[12].startswith(first.id + ", %WER")
    assert first.ref == [lines[13].strip()] and first.hyp == [lines[15].strip()]


SB_ROWS = [
    ("utt_empty_hyp", ["COME"], [""]),  # empty-string token: blank cell
    ("utt_multi", ["AND"], ["AND", "⁇", "OF"]),  # two insertions, unk-like token
    ("utt_ins_del", ["THE", "QUICK", "BROWN", "FOX"], ["THE", "BROWN", "FOX", "JUMPS"]),
    ("utt_all_deleted", ["A", "B"], []),  # deletions: <eps> in the hyp row
    ("utt_unk", ["HELLO"], ["<unk>"]),
    ("utt_spaced_token", ["X"], ["AND ⁇ OF"]),  # one token holding spaces
    ("utt_right", ["YES"], ["YES"]),
    ("utt_empty_ref", [], ["EXTRA"]),  # insertion into nothing
    ("utt_nothing", [], []),  # three empty rows
    ("utt_wide", ["SUPERCALIFRAGILISTIC", "I"], ["S", "EYE", "EXTRA", "WORDS"]),
]


def test_speechbrain_written_file_round_trips(tmp_path):
    path = tmp_path / "wer_crafted.txt"
    stats = write_sb_file(path, SB_ROWS)
    summary = stats.summarize()
    parsed = read_wer_file(path)
    assert [u.id for u in parsed.utterances] == [r[0] for r in SB_ROWS]
    for (utt_id, ref, hyp), utt, score in zip(SB_ROWS, parsed.utterances, stats.scores):
        assert utt.ref == ref, utt_id
        assert utt.hyp == hyp, utt_id
        assert utt.insertions == score["insertions"]
        assert utt.deletions == score["deletions"]
        assert utt.substitutions == score["substitutions"]
        assert utt.edits == score["num_edits"] == edit_distance(ref, hyp)
        assert utt.ref_count == score["num_ref_tokens"]
    assert parsed.wer == f"{summary['WER']:.2f}"
    assert parsed.ser == f"{summary['SER']:.2f}"
    assert parsed.edits == summary["num_edits"]
    assert parsed.ref_tokens == summary["num_scored_tokens"]
    assert (parsed.insertions, parsed.deletions, parsed.substitutions) == (
        summary["insertions"],
        summary["deletions"],
        summary["substitutions"],
    )
    assert parsed.n_sentences == summary["num_scored_sents"] == len(SB_ROWS)
    metrics = parsed.metrics()
    assert metrics["WER"] == pytest.approx(summary["WER"])
    assert metrics["SER"] == pytest.approx(summary["SER"])


def test_trailing_blanks_stripped_by_an_editor_still_parse(tmp_path):
    path = tmp_path / "wer_crafted.txt"
    write_sb_file(path, SB_ROWS)
    stripped = tmp_path / "wer_stripped.txt"
    stripped.write_text(
        "\n".join(line.rstrip() for line in path.read_text(encoding="utf-8").split("\n")), encoding="utf-8"
    )
    a, b = read_wer_file(path), read_wer_file(stripped)
    assert [(u.ref, u.hyp) for u in a.utterances] == [(u.ref, u.hyp) for u in b.utterances]


def test_tampered_header_is_detected(tmp_path, real_files):
    original = real_files[0].read_text(encoding="utf-8")
    lines = original.split("\n")
    w = re.match(r"%WER (\d+)\.(\d\d) (.*)", lines[0])
    lines[0] = f"%WER {w[1]}.{(int(w[2]) + 1) % 100:02d} {w[3]}"  # one hundredth off
    tampered = tmp_path / "wer_tampered.txt"
    tampered.write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(WerFileMismatch, match="%WER"):
        read_wer_file(tampered)
    assert any("%WER" in m for m in read_wer_file(tampered, check=False).mismatches)

    # the error count of %SER, consistent-looking but wrong
    lines = original.split("\n")
    s = re.match(r"%SER (\S+) \[ (\d+) / (\d+) \]", lines[1])
    lines[1] = f"%SER {s[1]} [ {int(s[2]) + 1} / {s[3]} ]"
    tampered.write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(ValueError, match="erroneous"):
        read_wer_file(tampered)


def test_tampered_alignment_is_detected_with_file_and_line(tmp_path, real_files):
    lines = real_files[0].read_text(encoding="utf-8").split("\n")
    # utterance block: line 13 (1-based) is the first utterance's header; flip its op row
    assert lines[14].strip() in {"=", "S"}
    lines[14] = lines[14].replace("=", "S") if "=" in lines[14] else lines[14].replace("S", "=")
    bad = tmp_path / "wer_bad.txt"
    bad.write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(ValueError, match=r"wer_bad\.txt:1[3-6]:"):
        read_wer_file(bad)

    truncated = tmp_path / "wer_truncated.txt"
    truncated.write_text("\n".join(real_files[0].read_text(encoding="utf-8").split("\n")[:14]), encoding="utf-8")
    with pytest.raises(ValueError, match=r"wer_truncated\.txt:\d+: file ends"):
        read_wer_file(truncated)

    garbage = tmp_path / "wer_garbage.txt"
    garbage.write_text("hello\nworld\n!\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"wer_garbage\.txt:1:"):
        read_wer_file(garbage)


# Four systems on six shared utterances (+1 only A has). Hand-worked expectations below.
REFS = {
    "M08_B3_CW1_M2": ["COME"],
    "M08_B3_CW1_M3": ["COME"],
    "M08_B3_CW2_M2": ["WE"],
    "M08_B3_CW2_M3": ["WE"],
    "M08_B3_LA_M2": ["ALPHA"],
    "M08_B3_LZ_M2": ["ZULU"],
    "M08_B3_D1_M2": ["ONE"],
}
HYPS = {  # system -> utterance -> hypothesis
    "A": {
        "M08_B3_CW1_M2": ["COME"],
        "M08_B3_CW1_M3": ["GUM"],
        "M08_B3_CW2_M2": ["NO", "ONE"],
        "M08_B3_CW2_M3": [""],
        "M08_B3_LA_M2": ["ALPHA"],
        "M08_B3_LZ_M2": ["ROMEO"],
        "M08_B3_D1_M2": ["ONE"],
    },
    "B": {
        "M08_B3_CW1_M2": ["COME"],
        "M08_B3_CW1_M3": ["CALM"],
        "M08_B3_CW2_M2": ["NO", "ONE"],
        "M08_B3_CW2_M3": ["WE", "WE"],
        "M08_B3_LA_M2": ["ALFA"],
        "M08_B3_LZ_M2": ["ZULU"],
    },
    "C": {
        "M08_B3_CW1_M2": ["CALM"],
        "M08_B3_CW1_M3": ["COME"],
        "M08_B3_CW2_M2": ["WE"],
        "M08_B3_CW2_M3": [""],
        "M08_B3_LA_M2": ["ALFA"],
        "M08_B3_LZ_M2": ["ZULU"],
    },
    "D": {
        "M08_B3_CW1_M2": ["COME"],
        "M08_B3_CW1_M3": ["GUM"],
        "M08_B3_CW2_M2": ["WEE"],
        "M08_B3_CW2_M3": ["WHY"],
        "M08_B3_LA_M2": ["ALFA"],
        "M08_B3_LZ_M2": ["ROMEO"],
    },
}
SHARED = list(REFS)[:6]
# Majority vote, worked by hand:
#   CW1_M2: COME x3 vs CALM                         -> COME
#   CW1_M3: GUM (A, D) x2, CALM, COME               -> GUM
#   CW2_M2: NO ONE (A, B) x2, WE, WEE               -> NO ONE
#   CW2_M3: "" (A, C) x2, WE WE, WHY                -> ""
#   LA_M2 : ALFA x3 vs ALPHA                        -> ALFA
#   LZ_M2 : ROMEO (A, D) x2 vs ZULU (B, C) x2: tie  -> the best-ranked system's: with no data to rank
#           the systems on (these files have no other speakers' files beside them), the first name, A:
#           ROMEO (1 edit); ranked B first (--vote_rank B A C D): ZULU (right)
VOTE = [["COME"], ["GUM"], ["NO", "ONE"], [""], ["ALFA"]]  # + the tied LZ_M2
# Oracle (fewest edits, ties to the earliest system), worked by hand:
#   CW1_M2 A COME (0); CW1_M3 C COME (0); CW2_M2 C WE (0);
#   CW2_M3 everyone has 1 edit -> A "" (1); LA_M2 A ALPHA (0); LZ_M2 B ZULU (0)
ORACLE = [["COME"], ["COME"], ["WE"], [""], ["ALPHA"], ["ZULU"]]
ORACLE_RIGHT = 5  # every utterance but CW2_M3 has a system that is exactly right


@pytest.fixture()
def crafted_systems(tmp_path):
    paths = []
    for name, hyps in HYPS.items():
        folder = tmp_path / name
        folder.mkdir()
        path = folder / "wer_M08.txt"
        write_sb_file(path, [(u, REFS[u], h) for u, h in hyps.items()])
        paths.append(path)
    return paths


def _rates(hyps, refs):
    edits = sum(edit_distance(r, h) for r, h in zip(refs, hyps))
    words = sum(len(r) for r in refs)
    wrong = sum(edit_distance(r, h) > 0 for r, h in zip(refs, hyps))
    return 100.0 * edits / words, 100.0 * wrong / len(refs)


def test_vote_ties_go_to_the_best_ranked_system_whatever_the_order():
    hyps = [["X"], ["Y"], ["Y"], ["X"]]
    names = ["s0", "s1", "s2", "s3"]
    rank = [rank_key(0.5), rank_key(0.5), rank_key(0.5, -1.0), rank_key(0.5, -2.0)]  # s2: the best
    for perm in ([0, 1, 2, 3], [1, 0, 3, 2], [3, 2, 1, 0]):
        top = vote([hyps[k] for k in perm])
        assert len(top) == 2  # a tie
        winner = pick(top, [rank[k] for k in perm], [names[k] for k in perm])
        assert names[perm[winner]] == "s2"  # equal accuracies: the continuous statistic decides
    top = vote(hyps)
    assert hyps[pick(top, [rank_key(0.5)] * 4, names)] == ["X"]  # all equal: the first name, s0
    assert hyps[pick(top, [rank_key(None), rank_key(0.1), rank_key(None), rank_key(None)], names)] == ["Y"]
    top = vote([["Z"], ["X"], ["Y"], ["X"]])
    assert list(top) == [("X",)] and pick(top, rank, names) in (1, 3)  # no tie: the majority


def test_vote_and_oracle_on_crafted_files(crafted_systems):
    result = compare(crafted_systems, names=list(HYPS))
    refs = [REFS[u] for u in SHARED]
    assert result["n_shared"] == 6
    assert result["reference"] == "A"

    # per system: whole file vs shared ids
    assert result["systems"]["A"]["n"] == 7 and result["systems"]["A"]["shared"]["n"] == 6
    for name, hyps in HYPS.items():
        wer, ser = _rates([hyps[u] for u in SHARED], refs)
        shared = result["systems"][name]["shared"]
        assert shared["WER"] == pytest.approx(wer) and shared["SER"] == pytest.approx(ser)
        assert shared["WRA"] == pytest.approx(100.0 - ser)
        wer_all, ser_all = _rates(list(hyps.values()), [REFS[u] for u in hyps])
        assert result["systems"][name]["WER"] == pytest.approx(wer_all)
        assert result["systems"][name]["SER"] == pytest.approx(ser_all)

    vote_wer, vote_ser = _rates(VOTE, refs[:5])
    # by hand, too: edits 0 + 1 + 2 + 1 + 1 + 1 (LZ_M2: A's ROMEO) = 6 over 6 words; CW1_M2 right
    assert (vote_wer * 5 / 6, vote_ser * 5 / 6) == pytest.approx((100.0 * 5 / 6, 100.0 * 4 / 6))
    assert result["majority_vote"]["WER"] == pytest.approx(100.0 * 6 / 6)
    assert result["majority_vote"]["WRA"] == pytest.approx(100.0 * 1 / 6)
    assert result["majority_vote"]["SER"] == pytest.approx(100.0 - 100.0 * 1 / 6)
    assert result["majority_vote"]["ties"] == 1
    assert {r["kind"] for r in result["majority_vote"]["ranking"].values()} == {"none"}
    assert any("no data to rank the systems" in w for w in result["warnings"])
    # the order of the files does not matter
    shuffled = compare(list(reversed(crafted_systems)), names=list(reversed(list(HYPS))), reference="A")
    for key in ("WER", "WRA", "ties"):
        assert shuffled["majority_vote"][key] == pytest.approx(result["majority_vote"][key])
    # a ranking given: B first, so LZ_M2's tie goes to B's ZULU (right, 0 edits)
    ranked = compare(crafted_systems, names=list(HYPS), vote_rank=["B", "A", "C", "D"])
    assert ranked["majority_vote"]["WER"] == pytest.approx(100.0 * 5 / 6)
    assert ranked["majority_vote"]["WRA"] == pytest.approx(100.0 * 2 / 6)
    assert ranked["majority_vote"]["ranking"]["B"]["position"] == 1
    with pytest.raises(ValueError, match="--vote_rank must name every system once"):
        compare(crafted_systems, names=list(HYPS), vote_rank=["B", "A", "C"])

    oracle_wer, oracle_ser = _rates(ORACLE, refs)
    assert (oracle_wer, oracle_ser) == pytest.approx((100.0 / 6, 100.0 / 6))
    assert result["oracle"]["WER"] == pytest.approx(oracle_wer)
    assert result["oracle"]["WRA"] == pytest.approx(100.0 - oracle_ser)
    assert result["oracle"]["WRA_any_right"] == pytest.approx(100.0 * ORACLE_RIGHT / 6)

    assert [d["id"] for d in result["disagreements"]] == SHARED  # no two utterances agree fully
    third = result["disagreements"][2]
    assert third["hyps"] == {"A": "NO ONE", "B": "NO ONE", "C": "WE", "D": "WEE"}
    assert third["ref"] == "WE"

    assert set(result["paired_tests"]) == {"B", "C", "D"}
    for tests in result["paired_tests"].values():
        for test in tests.values():
            assert 0.0 < test["p_value"] <= 1.0
            assert test["n_groups"] == 4  # CW1, CW2, LA, LZ: mics of a word are one group


def test_vote_ranks_each_system_on_its_other_speakers_files(tmp_path):
    """In a cross_testing layout (<MODEL>/wer_<SPK>.txt) the vote's ties go to the system with the
    higher WRA on its folder's files of OTHER speakers: never the compared speaker's (even stored
    under another name), nor the model's own speaker's; a file that is not a wer file is named."""
    ct = tmp_path / "cross_testing"
    for model in ("F05", "M09"):
        (ct / model).mkdir(parents=True)
    compared = {"F05": [["GUM"], ["WE"]], "M09": [["COME"], ["WE"]]}  # the first utterance: a tie
    for model, hyps in compared.items():
        write_sb_file(
            ct / model / "wer_M08.txt", list(zip(["M08_B3_CW1_M2", "M08_B3_CW2_M2"], [["COME"], ["WE"]], hyps))
        )
    # the ranking data: F05 right on 1 of 2 of F02's words, M09 on 2 of 2
    write_sb_file(ct / "F05" / "wer_F02.txt", [("F02_B3_CW1_M2", ["COME"], ["COME"]), ("F02_B3_CW2_M2", ["WE"], ["X"])])
    write_sb_file(
        ct / "M09" / "wer_F02.txt", [("F02_B3_CW1_M2", ["COME"], ["COME"]), ("F02_B3_CW2_M2", ["WE"], ["WE"])]
    )
    # decoys that would turn the ranking round if they counted
    words = [(f"CW{k}", "COME") for k in range(3, 13)]
    write_sb_file(ct / "F05" / "wer_F05.txt", [(f"F05_B3_{key}_M2", [w], [w]) for key, w in words])  # own speaker
    write_sb_file(ct / "M09" / "wer_X99.txt", [(f"M08_B3_{key}_M3", [w], ["NO"]) for key, w in words])  # M08's
    (ct / "F05" / "wer_notes.txt").write_text("not a wer file\n")
    result = compare([ct / "F05" / "wer_M08.txt", ct / "M09" / "wer_M08.txt"], n_perm=50, n_boot=20)
    ranking = result["majority_vote"]["ranking"]
    assert ranking["F05/wer_M08"]["accuracy"] == 0.5 and ranking["F05/wer_M08"]["files"] == 1
    assert ranking["M09/wer_M08"]["accuracy"] == 1.0 and ranking["M09/wer_M08"]["utterances"] == 2
    assert result["majority_vote"]["ties"] == 1 and result["majority_vote"]["WRA"] == pytest.approx(100.0)
    assert any("wer_notes.txt" in w and "not read for the vote's ranking" in w for w in result["warnings"])
    # without the ranking data the tie would go by name, to F05's wrong word
    assert compare([ct / "F05" / "wer_M08.txt", ct / "M09" / "wer_M08.txt"], vote_rank=["F05/wer_M08", "M09/wer_M08"])[
        "majority_vote"
    ]["WRA"] == pytest.approx(50.0)


def test_disagreement_list_skips_unanimous_utterances(tmp_path):
    paths = []
    for name, hyp in (("A", ["GUM"]), ("B", ["GUM"])):
        (tmp_path / name).mkdir()
        paths.append(tmp_path / name / "wer_M08.txt")
        write_sb_file(paths[-1], [("M08_B3_CW1_M2", ["COME"], hyp), ("M08_B3_CW1_M3", ["COME"], [name])])
    result = compare(paths)
    assert [d["id"] for d in result["disagreements"]] == ["M08_B3_CW1_M3"]
    assert result["names"] == ["A/wer_M08", "B/wer_M08"]


def test_reference_by_name_and_bad_names(crafted_systems):
    result = compare(crafted_systems, names=list(HYPS), reference="C")
    assert result["reference"] == "C" and set(result["paired_tests"]) == {"A", "B", "D"}
    with pytest.raises(ValueError):
        compare(crafted_systems, names=["A", "B", "C"])
    with pytest.raises(ValueError):
        compare(crafted_systems, names=list(HYPS), reference="nobody")


def test_cli_on_three_real_m08_files(tmp_path, shared_uaspeech):
    files = [shared_uaspeech / "cross_testing" / sa / "wer_M08.txt" for sa in ("F02", "M11", "M04")]
    out = tmp_path / "out" / "cmp.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, files), "--json", str(out), "--n_perm", "2000", "--n_boot", "200"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text(encoding="utf-8"))
    assert data["names"] == ["F02/wer_M08", "M11/wer_M08", "M04/wer_M08"]
    for name, path in zip(data["names"], files):
        head = header_numbers(path)
        system = data["systems"][name]
        assert f"{system['WER']:.2f}" == head["WER"]
        assert f"{system['SER']:.2f}" == head["SER"]
        assert system["WRA"] == pytest.approx(100.0 - float(head["SER"]), abs=0.006)
        assert system["n"] == head["n"]
        assert name in proc.stdout
    for key in ("majority_vote", "oracle", "paired_tests", "disagreements"):
        assert key in data
    assert set(data["paired_tests"]) == {"M11/wer_M08", "M04/wer_M08"}
    # oracle can never be worse than the best system
    assert data["oracle"]["WRA"] >= max(s["WRA"] for s in data["systems"].values())
    assert "majority vote" in proc.stdout and "oracle" in proc.stdout
    assert not [p for p in out.parent.iterdir() if p.name != "cmp.json"]  # no temp file left


def test_mean_and_best_single_of_the_14_real_m08_files(shared_uaspeech):
    """The summary rows of the README's M08 comparison, against the files' own headers."""
    files = sorted((shared_uaspeech / "cross_testing").glob("*/wer_M08.txt"))
    assert len(files) == 14
    result = compare(files, n_perm=200, n_boot=100)
    heads = [header_numbers(p) for p in files]
    wras = [100.0 - float(h["SER"]) for h in heads]
    assert result["mean_of_systems"]["WRA"] == pytest.approx(sum(wras) / 14, abs=0.01)
    assert result["mean_of_systems"]["WER"] == pytest.approx(sum(float(h["WER"]) for h in heads) / 14, abs=0.01)
    best = max(range(14), key=lambda k: wras[k])
    assert result["best_single"]["name"] == result["names"][best]
    assert result["best_single"]["WRA"] == pytest.approx(wras[best], abs=0.01)
    assert result["oracle"]["WRA"] >= result["best_single"]["WRA"] >= result["mean_of_systems"]["WRA"]


def _recipe_output(folder, rows, synthetic, decoding="teacher-forced greedy", name="wer_test.txt"):
    """A wer file with the test_results.json the recipe writes beside it."""
    folder.mkdir(parents=True)
    write_sb_file(folder / name, rows)
    results = {"synthetic_data": synthetic, "decoding": decoding, "wer_files": {name: {"decoding": decoding}}}
    (folder / "test_results.json").write_text(json.dumps(results))
    return folder / name


def _cli(*args, cwd):
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args), "--n_perm", "200", "--n_boot", "50"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_vote_rank_names_every_system(crafted_systems, tmp_path):
    from compare import comparison_table

    text = comparison_table(compare(crafted_systems, names=list(HYPS), vote_rank=["B", "A", "C", "D"]))
    assert "#1 (--vote_rank)" in text and "ties (1 utterances) to the best-ranked system" in text
    proc = _cli(*crafted_systems, "--names", *HYPS, "--vote_rank", "B", "A", "E", "D", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("ERROR: --vote_rank must name every system once")


def test_synthetic_and_real_are_never_compared(tmp_path):
    """A synthetic recipe output beside a real SpeechBrain file: refused, one line naming both files,
    nothing written; two synthetic outputs compare (and say SYNTHETIC)."""
    rows = [(u, REFS[u], REFS[u]) for u in REFS]
    synthetic = _recipe_output(tmp_path / "demo" / "M08", rows, synthetic=True)
    real = tmp_path / "sb" / "wer_M08.txt"
    real.parent.mkdir()
    write_sb_file(real, rows)
    with pytest.raises(ValueError, match="refusing to compare SYNTHETIC with real data"):
        compare([real, synthetic])
    out = tmp_path / "cmp.json"
    proc = _cli(real, synthetic, "--json", out, cwd=tmp_path)
    assert proc.returncode == 2 and not out.exists()
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("ERROR: refusing") and str(synthetic) in line and str(real) in line
    other = _recipe_output(tmp_path / "demo2" / "M08", rows, synthetic=True)
    proc = _cli(synthetic, other, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "SYNTHETIC" in proc.stdout
    # a file under a synthetic tree (its SYNTHETIC.json) counts as synthetic without a results file
    tree = tmp_path / "tree"
    (tree / "cross_testing" / "F02").mkdir(parents=True)
    (tree / "SYNTHETIC.json").write_text("{}")
    write_sb_file(tree / "cross_testing" / "F02" / "wer_M08.txt", rows)
    with pytest.raises(ValueError, match="refusing"):
        compare([real, tree / "cross_testing" / "F02" / "wer_M08.txt"])


def test_decodings_are_printed_and_a_mix_is_warned_about(tmp_path):
    rows = [(u, REFS[u], REFS[u]) for u in REFS]
    student = _recipe_output(tmp_path / "kd" / "M08", rows, synthetic=False)
    real = tmp_path / "sb" / "wer_M08.txt"
    real.parent.mkdir()
    write_sb_file(real, rows)
    same = compare([real, tmp_path / "sb" / "wer_M08.txt"], names=["a", "b"])
    assert same["warnings"] == []
    mixed = compare([student, real])
    assert len(mixed["warnings"]) == 1 and "decoded differently" in mixed["warnings"][0]
    assert mixed["systems"][mixed["names"][0]]["decoding"] == "teacher-forced greedy"
    proc = _cli(student, real, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("WARNING") and lines[-1].startswith("WARNING")  # first and last
    assert "teacher-forced greedy" in proc.stdout and "not recorded in the file" in proc.stdout


def test_reference_mismatch_names_both_files(tmp_path):
    rows = [(u, REFS[u], REFS[u]) for u in REFS]
    first = _recipe_output(tmp_path / "a", rows, synthetic=False)
    changed = [(u, ["OTHER"] if k == 0 else REFS[u], REFS[u]) for k, u in enumerate(REFS)]
    second = _recipe_output(tmp_path / "b", changed, synthetic=False)
    with pytest.raises(ValueError) as err:
        compare([first, second])
    message = str(err.value)
    assert str(first) in message and str(second) in message and "OTHER" in message
