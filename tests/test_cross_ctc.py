"""Cross streams (teachers on the held-out speaker's audio) and the free-running CTC decodes."""

import json

import pytest
import torch
import torch.nn.functional as F

from local.ctc import ClosedList
from local.store import load_tokenizer
from local.wer_files import read_wer_file

from test_recipe import FAST, run_recipe
from test_scoring import edit_distance


def test_closed_list_equals_full_vocabulary_ctc(demo_tree):
    sp = load_tokenizer(demo_tree / "tokenizer.model")
    words = ["SEVEN", "ALPHA", "COMMAND", "THE", "DELETE", "A"]
    decoder = ClosedList(words, sp)
    torch.manual_seed(0)
    for _trial in range(20):
        logp = F.log_softmax(torch.randn(14, sp.vocab_size()) * 3, -1)
        nll = [
            float(
                F.ctc_loss(
                    logp[:, None],
                    torch.tensor([sp.encode_as_ids(w)]),
                    torch.tensor([14]),
                    torch.tensor([len(sp.encode_as_ids(w))]),
                    blank=0,
                )
            )
            * len(sp.encode_as_ids(w))
            for w in sorted(words)
        ]  # mean reduction divides by the target length: undo it
        assert decoder(logp) == sorted(words)[min(range(len(nll)), key=nll.__getitem__)]


def _independent(tree, model, speaker):
    """Greedy teacher-forced hypotheses of one pair, straight from its .pt file."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tree / "tokenizer.model"))
    folder = tree / "logit_extraction" / model / speaker
    meta = json.loads((folder / f"{speaker}_metadata.json").read_text())
    logits = torch.load(folder / f"{speaker}_decoder_logits.pt", weights_only=True)
    hyps = {}
    for utt_id, z in zip(meta["utterance_ids"], logits):
        ids = z.argmax(-1).tolist()
        hyps[utt_id] = sp.decode_ids(ids[: ids.index(2)] if 2 in ids else ids)
    return hyps, dict(zip(meta["utterance_ids"], meta["target_words"]))


@pytest.fixture(scope="module")
def cross_run(demo_tree_cross, tmp_path_factory):
    out = tmp_path_factory.mktemp("cross") / "out"
    run_recipe(
        "M16",
        f"--output_folder={out}",
        "--input_streams=cross",
        "--fusion=weights",
        "--number_of_epochs=2",
        "--ctc_decode=true",
        *FAST,
        demo_tree=demo_tree_cross,
    )
    return out, json.loads((out / "test_results.json").read_text())


def test_cross_baselines_and_outputs(cross_run):
    out, results = cross_run
    assert results["input_streams"] == "cross" and results["teachers"] == ["F02", "M07"]
    assert set(results["baselines"]) == {"sa_self", "mean", "teacher_F02", "teacher_M07", "majority_vote"}
    for name in results["baselines"]:
        assert (out / f"wer_test_{name}.txt").is_file()
    assert set(results["free_running_ctc"]) == {"sa_self", "mean"}
    for system in ("sa_self", "mean"):
        for decoder in ("greedy", "closed_list"):
            assert (out / f"wer_test_ctc_{decoder}_{system}.txt").is_file()
            assert results["free_running_ctc"][system][decoder]["n"] == results["n_utterances"]


def test_each_teacher_alone_matches_its_file(cross_run, demo_tree_cross):
    out, results = cross_run
    for model in ("F02", "M07"):
        hyps, refs = _independent(demo_tree_cross, model, "M16")
        edits = sum(edit_distance(refs[u].split(" "), h.split(" ")) for u, h in hyps.items())
        exact = sum(edit_distance(refs[u].split(" "), h.split(" ")) == 0 for u, h in hyps.items())
        assert results["baselines"][f"teacher_{model}"]["WER"] == pytest.approx(100 * edits / len(hyps))
        assert results["baselines"][f"teacher_{model}"]["WRA"] == pytest.approx(100 * exact / len(hyps))


def test_majority_vote_of_the_teachers(cross_run):
    out, results = cross_run
    teachers = [read_wer_file(out / f"wer_test_teacher_{m}.txt").by_id() for m in ("F02", "M07")]
    vote = read_wer_file(out / "wer_test_majority_vote.txt").by_id()
    # the ranking: on the training audio (train and validation items), never on the test
    ranking = results["teacher_ranking"]
    key = {m: (ranking[m]["accuracy"], ranking[m]["mean_logprob"]) for m in ("F02", "M07")}
    better = 0 if key["F02"] >= key["M07"] else 1  # equal: the first name
    assert results["best_single_teacher"]["name"] == ("F02", "M07")[better]
    assert results["best_single_teacher"]["accuracy"] == results["teacher_accuracy"][("F02", "M07")[better]]
    ties = 0
    for utt_id, utt in vote.items():
        hyps = [t[utt_id].hyp for t in teachers]
        ties += hyps[0] != hyps[1]
        # two teachers: they agree, or the tie goes to the one more accurate on the teacher speakers
        assert utt.hyp == hyps[better]
    best = f"teacher_{('F02', 'M07')[better]}"
    assert results["baselines"]["majority_vote"]["WER"] == pytest.approx(results["baselines"][best]["WER"])
    assert results["baselines"]["majority_vote"]["ties"] == ties


def test_compare_py_votes_the_runs_teacher_files_as_the_run_does(cross_run):
    """compare.py on a run's teacher files ranks them by the run's teacher_ranking (the one tie
    rule): its vote is the run's majority_vote, utterance by utterance."""
    from compare import compare

    out, results = cross_run
    result = compare([out / "wer_test_teacher_F02.txt", out / "wer_test_teacher_M07.txt"], n_perm=20, n_boot=20)
    assert {r["kind"] for r in result["majority_vote"]["ranking"].values()} == {"teacher_ranking"}
    vote = results["baselines"]["majority_vote"]
    assert result["majority_vote"]["ties"] == vote["ties"] > 0
    assert result["majority_vote"]["WRA"] == pytest.approx(vote["WRA"]) and result["majority_vote"][
        "WER"
    ] == pytest.approx(vote["WER"])


def test_ctc_greedy_matches_an_independent_decode(cross_run, demo_tree_cross):
    import sentencepiece as spm

    out, results = cross_run
    sp = spm.SentencePieceProcessor(model_file=str(demo_tree_cross / "tokenizer.model"))
    folder = demo_tree_cross / "logit_extraction" / "M16" / "M16"
    meta = json.loads((folder / "M16_metadata.json").read_text())
    ctc = torch.load(folder / "M16_ctc_logits.pt", weights_only=True)
    edits = exact = 0
    for word, z in zip(meta["target_words"], ctc):
        best = z.argmax(-1).tolist()
        ids = [t for k, t in enumerate(best) if t != 0 and (k == 0 or t != best[k - 1])]
        e = edit_distance(word.split(" "), sp.decode_ids(ids).split(" "))
        edits, exact = edits + e, exact + (e == 0)
    got = results["free_running_ctc"]["sa_self"]["greedy"]
    assert got["WER"] == pytest.approx(100 * edits / len(ctc))
    assert got["WRA"] == pytest.approx(100 * exact / len(ctc))


def test_ctc_files_are_not_opened_unless_asked_for(copy_tree, tmp_path):
    tree = copy_tree()
    (tree / "logit_extraction" / "M16" / "M16" / "M16_ctc_logits.pt").write_bytes(b"not a torch file")
    args = (
        f"--logit_root={tree / 'logit_extraction'}",
        f"--tokenizer_file={tree / 'tokenizer.model'}",
        "--number_of_epochs=1",
        *FAST,
    )
    run_recipe("M16", f"--output_folder={tmp_path / 'a'}", *args)  # the default: CTC files untouched
    results = json.loads((tmp_path / "a" / "test_results.json").read_text())
    assert results["free_running_ctc"] == {}
    proc = run_recipe("M16", f"--output_folder={tmp_path / 'b'}", "--ctc_decode=true", *args, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "ERROR:" in proc.stderr and "M16_ctc_logits.pt" in proc.stderr
    assert not (tmp_path / "b").exists()  # stopped before training, nothing written


def test_the_closed_list_is_the_teachers_words_not_the_test_references(demo_tree):
    """score_ctc decodes from the word list it is given (train.py gives the teacher speakers'
    words): a word of the list absent from the test can be chosen, a test word absent from the
    list never is."""
    from local.ctc import ctc_systems, score_ctc

    sp = load_tokenizer(demo_tree / "tokenizer.model")
    root = demo_tree / "logit_extraction"
    meta = json.loads((root / "M16" / "M16" / "M16_metadata.json").read_text())
    items = {
        u: {"word": w, "category": "D", "mic": u.rsplit("_", 1)[1]}
        for u, w in zip(meta["utterance_ids"], meta["target_words"])
    }
    test_words = sorted(set(meta["target_words"]))
    systems = ctc_systems(root, "M16", ["F02", "M07"], cross=False)
    full = score_ctc(root, "M16", systems, items, sp, test_words)["sa_self"]["closed_list"]
    dropped = {w for w in test_words if full.hypotheses and w in set(full.hypotheses.values())}
    dropped = sorted(dropped)[: max(1, len(dropped) // 2)]
    kept = [w for w in test_words if w not in dropped] + ["GARDEN"]  # a word no test utterance says
    partial = score_ctc(root, "M16", systems, items, sp, kept)["sa_self"]["closed_list"]
    assert not set(partial.hypotheses.values()) & set(dropped)
    assert set(partial.hypotheses.values()) <= set(kept)


def test_a_missing_pair_of_the_cross_audio_is_named_with_the_option(copy_tree, tmp_path):
    """A logit tree without the teacher models on the other speakers' audio (only each model on its
    own speaker): one line naming the missing pair and --cross_audio, nothing written."""
    tree = copy_tree()
    out = tmp_path / "out"
    proc = run_recipe(
        "M16",
        f"--output_folder={out}",
        f"--logit_root={tree / 'logit_extraction'}",
        f"--tokenizer_file={tree / 'tokenizer.model'}",
        "--input_streams=cross",
        *FAST,
        check=False,
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("ERROR: missing folder") and "SA model M07 on speaker F02" in line
    assert "--cross_audio=teachers" in line
    assert not out.exists()
