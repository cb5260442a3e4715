"""Decoding and scoring parity with the SA pipeline: the greedy rule, decode_ids(...).split(" "),
ErrorRateStats, checked against an independent word-level edit distance."""

import pytest
import torch

from local.files import atomic_write
from local.scoring import SystemScores, greedy_ids
from local.store import load_tokenizer


def edit_distance(ref, hyp):
    """Plain Levenshtein distance between two token lists (independent of SpeechBrain)."""
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1]


def independent_scores(pairs):
    """WER and WRA (percent) of (reference word, hypothesis text) pairs, tokens by .split(" ")."""
    edits = sum(edit_distance(ref.split(" "), hyp.split(" ")) for ref, hyp in pairs)
    words = sum(len(ref.split(" ")) for ref, _ in pairs)
    exact = sum(edit_distance(ref.split(" "), hyp.split(" ")) == 0 for ref, hyp in pairs)
    return 100.0 * edits / words, 100.0 * exact / len(pairs)


def test_greedy_rule_cuts_at_first_eos():
    V = 6

    def one_hot(seq):
        return torch.nn.functional.one_hot(torch.tensor(seq), V).float()

    logits = torch.stack([one_hot([3, 4, 2, 5]), one_hot([2, 3, 4, 5]), one_hot([3, 4, 5, 5]), one_hot([0, 2, 2, 2])])
    lengths = torch.tensor([4, 4, 3, 4])
    assert greedy_ids(logits, lengths) == [[3, 4], [], [3, 4, 5], [0]]


@pytest.fixture(params=["demo", "real"])
def tokenizer(request, demo_tree, shared_uaspeech_optional):
    if request.param == "real":
        if shared_uaspeech_optional is None:
            pytest.skip("real SA tokenizer not present")
        return load_tokenizer(shared_uaspeech_optional / "sa_tokenizer.model")
    return load_tokenizer(demo_tree / "tokenizer.model")


@pytest.fixture
def shared_uaspeech_optional():
    from conftest import SHARED

    return SHARED if (SHARED / "sa_tokenizer.model").is_file() else None


def test_scores_match_an_independent_edit_distance(tokenizer):
    sp = tokenizer
    V = sp.vocab_size()
    words = ["SEVEN", "ALPHA", "COMMAND", "THE", "UP", "DELETE"]
    enc = {w: sp.encode_as_ids(w) for w in words}
    # Hypotheses (as id sequences before </s>): right, another word, empty, <unk>, a word with <unk>
    # inside, and one that never emits </s> (the decode then runs to the last position).
    plans = [
        ("SEVEN", enc["SEVEN"] + [2]),
        ("ALPHA", enc["THE"] + [2]),
        ("COMMAND", [2]),
        ("THE", [0, 2]),
        ("UP", enc["UP"][:1] + [0] + enc["DELETE"] + [2]),
        ("DELETE", (enc["DELETE"] + [7, 9, 11])[: len(enc["DELETE"]) + 1]),
    ]
    n_pos = [len(enc[w]) + 1 for w, _ in plans]  # U of each reference (teacher forcing)
    logits = torch.randn(len(plans), max(n_pos), V)
    expected = []
    for b, ((_word, seq), n) in enumerate(zip(plans, n_pos)):
        seq = (seq + [2] * n)[:n]
        for u, tok in enumerate(seq):
            logits[b, u, tok] += 100.0
        kept = seq[: seq.index(2)] if 2 in seq else seq
        expected.append(sp.decode_ids(kept))
    scores = SystemScores(sp)
    ids = [f"X_B3_D{i}_M5" for i in range(len(plans))]
    scores.append(ids, logits, torch.tensor(n_pos), [w for w, _ in plans], ["D"] * len(plans), ["M5"] * len(plans))
    texts = [scores.hypotheses[i] for i in ids]
    assert texts == expected
    assert texts[2] == ""  # empty hypothesis
    assert "⁇" in texts[3] and "⁇" in texts[4]  # <unk> decodes to " ⁇ "
    summary = scores.summary()
    wer, wra = independent_scores([(w, t) for (w, _), t in zip(plans, expected)])
    assert summary["WER"] == pytest.approx(wer)
    assert summary["WRA"] == pytest.approx(wra)
    assert summary["n"] == len(plans)
    # the normalised WER (.split()) differs exactly where .split(" ") makes extra tokens
    norm_edits = sum(edit_distance(w.split(), t.split()) for (w, _), t in zip(plans, texts))
    assert summary["WER_normalized"] == pytest.approx(100.0 * norm_edits / len(plans))
    # ... and equals jiwer's WER, a third implementation (jiwer normalises whitespace the same way)
    import jiwer

    refs, hyps = [w for w, _ in plans], texts
    assert summary["WER_normalized"] == pytest.approx(100.0 * jiwer.wer(refs, hyps))


def test_breakdowns_add_up(demo_tree):
    sp = load_tokenizer(demo_tree / "tokenizer.model")
    torch.manual_seed(0)
    n = 40
    words = ["SEVEN", "ALPHA", "COMMAND", "THE", "PAPER"] * 8
    cats = ["D", "L", "C", "CW", "UW"] * 8
    mics = [f"M{2 + i % 7}" for i in range(n)]
    lengths = torch.tensor([len(sp.encode_as_ids(w)) + 1 for w in words])
    logits = torch.randn(n, int(lengths.max()), sp.vocab_size()) * 4
    scores = SystemScores(sp)
    scores.append([f"F02_B3_X{i}_M2" for i in range(n)], logits, lengths, words, cats, mics)
    summary = scores.summary()
    assert list(summary["by_category"]) == ["D", "L", "C", "CW", "UW"]
    assert sum(c["n"] for c in summary["by_category"].values()) == n
    assert sum(c["edits"] for c in summary["by_mic"].values()) == summary["edits"]
    wrong = sum(c["n"] * (100 - c["WRA"]) / 100 for c in summary["by_category"].values())
    assert wrong == pytest.approx(n * (100 - summary["WRA"]) / 100)


def test_write_stats_is_speechbrain_format_and_atomic(demo_tree, tmp_path):
    sp = load_tokenizer(demo_tree / "tokenizer.model")
    scores = SystemScores(sp)
    logits = torch.zeros(1, 2, sp.vocab_size())
    logits[0, 0, sp.encode_as_ids("THE")[0]] = 9
    logits[0, 1, 2] = 9
    scores.append(["M08_B3_CW1_M2"], logits, torch.tensor([2]), ["THE"], ["CW"], ["M2"])
    path = tmp_path / "wer_test.txt"
    scores.write_stats(path)
    text = path.read_text()
    assert text.startswith("%WER ") and "M08_B3_CW1_M2, %WER" in text
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    # a failing writer leaves the old file untouched
    with pytest.raises(RuntimeError):
        atomic_write(path, lambda stream: (stream.write("partial"), (_ for _ in ()).throw(RuntimeError("boom"))))
    assert path.read_text() == text


def test_majority_vote_of_systems(demo_tree):
    from local.scoring import majority_vote

    sp = load_tokenizer(demo_tree / "tokenizer.model")
    plans = {  # utterance -> hypotheses of systems A, B, C, and the expected winner
        "F02_B3_D1_M2": (["SEVEN", "ALPHA", "SEVEN"], "SEVEN"),
        "F02_B3_D2_M2": (["THE", "UP", "DELETE"], "UP"),  # three-way tie: B, the most accurate on the teachers
        "F02_B3_D3_M2": (["UP", "DELETE", "DELETE"], "DELETE"),
        "F02_B3_D4_M2": (["", "", "UP"], ""),  # empty hypotheses vote too
    }
    accuracy = {"A": 0.2, "B": 0.7, "C": 0.5}  # on the teacher speakers, never on the test
    for order in (["A", "B", "C"], ["C", "B", "A"]):  # the order of the systems does not matter
        systems = {name: SystemScores(sp) for name in order}
        for utt_id, (hyps, _) in plans.items():
            for name, hyp in zip("ABC", hyps):
                systems[name].append_texts([utt_id], [hyp], ["SEVEN"], ["D"], ["M2"])
        voted, ties = majority_vote(systems, sp, accuracy)
        assert {u: voted.hypotheses[u] for u in plans} == {u: w for u, (_, w) in plans.items()}
        assert voted.summary()["WRA"] == pytest.approx(25.0) and ties == 1
    voted, _ = majority_vote(systems, sp, {"A": 0.5, "B": 0.5, "C": 0.5})  # equal: the first name
    assert voted.hypotheses["F02_B3_D2_M2"] == "THE"


def test_wra_counts_words_and_wra_pieces_counts_pieces(demo_tree):
    """A word spelled by other pieces than the reference's is right for WRA (the SA pipeline's rule
    scores the decoded text) but not for WRA_pieces, the share that teacher-forced and free-running
    greedy decoding have in common: so the two decodings' WRA can differ (docs/scoring.md)."""
    from local.synthetic import word_list

    sp = load_tokenizer(demo_tree / "tokenizer.model")
    found = None
    for word in word_list("demo", 2026).values():
        pieces = sp.encode_as_ids(word)
        for k in range(1, len(word)):
            left, right = sp.piece_to_id("\u2581" + word[:k]), sp.piece_to_id(word[k:])
            other = [left, right]
            if 0 not in other and other != pieces and sp.decode_ids(other) == word:
                found = (word, pieces, other)
                break
        if found:
            break
    assert found, "no demo word with a second segmentation"
    word, pieces, other = found
    scores = SystemScores(sp)
    scores.append_ids(["M08_B3_D1_M5", "M08_B3_D2_M5"], [pieces, other], [word, word], ["D", "D"], ["M5", "M5"])
    summary = scores.summary()
    assert summary["WRA"] == 100.0 and summary["WRA_pieces"] == 50.0
    text_only = SystemScores(sp)
    text_only.append_texts(["M08_B3_D1_M5"], [word], [word], ["D"], ["M5"])
    assert text_only.summary()["WRA_pieces"] is None
