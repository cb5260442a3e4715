"""Each system's free-running decoding chosen on the teacher speakers (tune_decoding.py,
local/decoding_choice.py) and decoded with it (decode.py --search chosen).

The validation audio is the fold's own validation productions (those train.py validates on,
rebuilt from the logit tree: tested against train.py's split), read by the models that read them at
training time; the held-out speaker's audio is never decoded (its CSV is not even given), so its
data cannot change a choice. The choice is the best candidate on that audio, ties to the first
listed; ``decode.py --search chosen`` then searches each system exactly as the candidate it was
given (its hypotheses are the plain search's, file for file).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_decode import UTTERANCES, _fold_folder, world  # noqa: F401  (world: the fixture models)

from conftest import RECIPE

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask:UserWarning"),
]


def test_candidates_order_and_the_tie_rule():
    from local.decoding_choice import candidates, choose, kind_of

    settings = {"beam_size": 8, "ctc_weight": 0.4, "lm_weight": 0.6, "temperature": 1.15}
    cands = candidates(settings, [0.4, 0.0], [0.6, 0.0])
    names = [c[0] for c in cands]
    # the SA setting first, greedy second, then the grid ascending; the SA pair not twice
    assert names == ["beam_ctc0.4_lm0.6", "greedy", "beam_ctc0_lm0", "beam_ctc0_lm0.6", "beam_ctc0.4_lm0"]
    assert dict((c[0], c[2]) for c in cands)["beam_ctc0_lm0.6"] == {**settings, "ctc_weight": 0.0, "lm_weight": 0.6}
    assert choose({"a": 1.0, "b": 2.0, "c": 2.0}, ["a", "b", "c"]) == "b"  # a tie: the first listed
    assert choose({"a": 2.0, "b": 2.0}, ["b", "a"]) == "b"
    assert choose({"a": 3.0, "b": 2.0}, ["b", "a"]) == "a"
    assert [kind_of(s) for s in ("student", "mean", "sa_self", "teacher_F02")] == ["student", "mean"] + ["single"] * 2
    with pytest.raises(ValueError):
        kind_of("majority_vote")


@pytest.mark.parametrize(
    "held_out, input_streams, teacher_set",
    [("M16", "cross", "same_level"), ("M05", "matched", "same_level"), ("M16", "matched", "all_others")],
)
def test_validation_utterances_are_train_pys(demo_tree, demo_tree_cross, held_out, input_streams, teacher_set):
    """The utterances tune_decoding.py decodes are the fold's validation items, speaker for speaker,
    read by the same models; none is the held-out speaker's."""
    from local.decoding_choice import validation_streams, validation_utterances
    from local.folds import build_items, store_pairs, teacher_speakers, validation_groups
    from local.store import LogitStore, TokenTable, load_tokenizer

    tree = demo_tree_cross if input_streams == "cross" else demo_tree
    tokens = TokenTable(load_tokenizer(tree / "tokenizer.model"))
    teachers = teacher_speakers(held_out, teacher_set)
    train_pairs, test_pairs = store_pairs(held_out, teachers, input_streams, "all_others")
    train = LogitStore(tree / "logit_extraction", tokens, train_pairs)
    test = LogitStore(tree / "logit_extraction", tokens, test_pairs)
    splits = build_items(train, test, held_out, teachers, input_streams, validation_groups(train, 0.2, 7))
    expected = {}
    for utt_id, item in splits["valid"].items():
        models = sorted(train.stream_model[j] for j in item["streams"])
        expected[utt_id] = (train.stream_speaker[item["streams"][0]], models)

    info = {"held_out": held_out, "teachers": teachers, "input_streams": input_streams}
    info["train_audio"] = sorted(set(train.stream_speaker))
    streams = validation_streams(info)
    store_ids = {s: [u for u, spk in zip(train.utt_ids, train.stream_speaker) if spk == s] for s in streams}
    store_ids = {s: list(dict.fromkeys(ids)) for s, ids in store_ids.items()}
    valid = validation_utterances(store_ids, 0.2, 7)
    got = {u: (spk, sorted(streams[spk])) for spk, ids in valid.items() for u in ids}
    assert got == expected and got
    assert held_out not in streams and all(held_out not in m for m in streams.values())


def _tree_and_csvs(world, root, speakers, models_of):  # noqa: F811
    """A logit tree holding only what tune_decoding.py reads of it (each pair's metadata) and a CSV
    per speaker: the fixture's four espeak-ng words as that speaker's utterances."""
    import soundfile

    audio = Path(__file__).parent / "fixtures" / "audio"
    csvs = root / "csv"
    csvs.mkdir(parents=True)
    for spk in speakers:
        ids = [f"{spk}{u[3:]}" for u, _ in UTTERANCES]
        rows = [
            f"{i},{soundfile.info(audio / (w + '.wav')).duration},{audio / (w + '.wav')},{spk},{w}"
            for i, (_, w) in zip(ids, UTTERANCES)
        ]
        (csvs / f"{spk}.csv").write_text("ID,duration,wav,spk_id,wrd\n" + "\n".join(rows) + "\n")
        for model in models_of[spk]:
            folder = root / "logits" / model / spk
            folder.mkdir(parents=True)
            meta = {"utterance_ids": ids, "target_words": [w for _, w in UTTERANCES], "num_utterances": len(ids)}
            (folder / f"{spk}_metadata.json").write_text(json.dumps(meta))
    return root / "logits", csvs


def _cross_fold(world, tmp_path):  # noqa: F811
    """A cross fold of held-out M16 with the fixture models as teachers M08 (``words``) and F05
    (``plain``); the training audio of speakers F02, F05 and M08."""
    folder = _fold_folder(world, tmp_path, input_streams="cross", teachers=("M08", "F05"))
    logits, csvs = _tree_and_csvs(
        world, tmp_path / "data", ["F02", "F05", "M08"], {"F02": ["M08", "F05"], "F05": ["M08"], "M08": ["F05"]}
    )
    info = json.loads((folder / "test_results.json").read_text())
    info.update(held_out="M16", seed=3, logit_root=str(logits), train_audio=["F02", "F05", "M08"])
    info["teacher_ranking"] = {"M08": {"accuracy": 0.5}, "F05": {"accuracy": 0.4}}
    (folder / "test_results.json").write_text(json.dumps(info))
    with open(folder / "hyperparams.yaml", "a") as handle:
        handle.write("valid_fraction: 0.5\n")
    return folder, csvs


def _models(world):  # noqa: F811
    words, plain = world["words"]["exp"], world["plain"]["exp"]
    return [f"M08={words / 'hyperparams.yaml'}:{words / 'save'}", f"F05={plain / 'hyperparams.yaml'}:{plain / 'save'}"]


def _tune(world, folder, csvs, *extra):  # noqa: F811
    cmd = [sys.executable, str(RECIPE / "tune_decoding.py"), str(folder), "--models", *_models(world)]
    cmd += ["--csv_folder", str(csvs), "--device", "cpu", "--noprogressbar", "--beam_size=3", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900)


def test_tune_then_decode_chosen(world, tmp_path):  # noqa: F811
    folder, csvs = _cross_fold(world, tmp_path)
    # the held-out speaker's audio is not there to read: it cannot change a choice
    assert sorted(p.name for p in csvs.iterdir()) == ["F02.csv", "F05.csv", "M08.csv"]
    # two candidates: the SA setting and greedy (whichever wins, decode.py's plain searches of the
    # same settings give the files to compare with)
    proc = _tune(world, folder, csvs, "--ctc_weights", "0.4", "--lm_weights", "0.6")
    assert proc.returncode == 0, proc.stderr[-3000:]
    choice = json.loads((folder / "decoding_choice.json").read_text())
    assert [c["name"] for c in choice["candidates"]] == ["beam_ctc0.4_lm0.6", "greedy"]
    # every non-held-out speaker of the training audio, read by the teacher models but its own
    assert choice["validation"] == {
        "F02": {"streams": ["F05", "M08"], "utterances": 2},
        "F05": {"streams": ["M08"], "utterances": 2},
        "M08": {"streams": ["F05"], "utterances": 2},
    }
    wra = choice["validation_WRA"]
    assert set(wra) == {"student", "mean", "majority_vote", "single"}
    for kind, judged_by in (("student", "student"), ("mean", "mean"), ("single", "majority_vote")):
        entry = choice["chosen"][kind]
        assert entry["judged_by"] == judged_by
        scores = wra[judged_by]
        best = max(scores.values())
        assert entry["candidate"] == next(n for n in ("beam_ctc0.4_lm0.6", "greedy") if scores[n] == best)
    assert "chosen for student:" in proc.stdout
    # a second run is refused, the file kept
    before = (folder / "decoding_choice.json").read_bytes()
    proc = _tune(world, folder, csvs)
    assert proc.returncode == 2 and "--force" in proc.stderr and "Traceback" not in proc.stderr
    assert (folder / "decoding_choice.json").read_bytes() == before

    # decode.py --search chosen: each system searched as its candidate; the same hypotheses as the
    # plain search of that candidate (the held-out speaker's CSV: the fixture's M08 words as M16's)
    _tree_and_csvs(world, tmp_path / "test", ["M16"], {"M16": []})
    csv = tmp_path / "test" / "csv" / "M16.csv"
    ids = [f"M16{u[3:]}" for u, _ in UTTERANCES]
    (folder / "test_utterances.json").write_text(json.dumps({"ids": ids}))
    cmd = [sys.executable, str(RECIPE / "decode.py"), str(folder), "--models", *_models(world)]
    cmd += ["--speaker_csv", str(csv), "--device", "cpu", "--noprogressbar", "--beam_size=3"]
    proc = subprocess.run(cmd + ["--search", "greedy", "beam", "chosen"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads((folder / "test_results.json").read_text())
    chosen = info["free_running"]["chosen"]
    assert chosen["chosen"] == {k: v["candidate"] for k, v in choice["chosen"].items()}
    plain = {"greedy": "greedy", "beam_ctc0.4_lm0.6": "beam"}
    for system in ("student", "mean", "teacher_M08", "teacher_F05", "majority_vote"):
        kind = {"student": "student", "mean": "mean"}.get(system, "single")
        key = plain[choice["chosen"][kind]["candidate"]]
        suffix = "" if system == "student" else f"_{system}"
        mine = (folder / f"wer_test_free_chosen{suffix}.txt").read_text()
        theirs = (folder / f"wer_test_free_{key}{suffix}.txt").read_text()
        assert mine == theirs, system
        decoding = info["wer_files"][f"wer_test_free_chosen{suffix}.txt"]["decoding"]
        assert decoding.startswith("each system decoded as chosen on the teacher speakers' validation audio")
        assert decoding.endswith(choice["chosen"][kind]["decoding"])
    assert "student: " in chosen["decoding"] and "SA models alone and their vote: " in chosen["decoding"]
    # a new choice removes the chosen decoding made with the old one (its figures would outlive it)
    proc = _tune(world, folder, csvs, "--force", "--ctc_weights", "0.4", "--lm_weights", "0.6")
    assert proc.returncode == 0 and "removed the chosen decoding made with the earlier choice" in proc.stdout
    info = json.loads((folder / "test_results.json").read_text())
    assert set(info["free_running"]) == {"greedy", "beam"} and not list(folder.glob("wer_test_free_chosen*"))
    assert not [f for f in info["wer_files"] if "chosen" in f] and (folder / "wer_test_free_greedy.txt").is_file()


def test_decode_chosen_refuses_a_missing_or_stale_choice(world, tmp_path):  # noqa: F811
    folder, csvs = _cross_fold(world, tmp_path)
    cmd = [sys.executable, str(RECIPE / "decode.py"), str(folder), "--models", *_models(world)]
    cmd += ["--speaker_csv", str(world["csv"]), "--device", "cpu", "--noprogressbar", "--search", "chosen"]
    info = json.loads((folder / "test_results.json").read_text())
    (folder / "test_results.json").write_text(json.dumps({**info, "held_out": "M08", "teachers": ["M08", "F05"]}))
    before = (folder / "test_results.json").read_bytes()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "run tune_decoding.py on this fold first" in proc.stderr
    assert "Traceback" not in proc.stderr and (folder / "test_results.json").read_bytes() == before
    # a choice of another fold, then of another student checkpoint
    choice = {"fold": {"held_out": "M16", "teachers": ["M08", "F05"], "input_streams": "cross"}}
    choice["chosen"] = {k: {"search": "greedy", "settings": {}} for k in ("student", "mean", "single")}
    (folder / "decoding_choice.json").write_text(json.dumps(choice))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "was chosen for the fold" in proc.stderr and "Traceback" not in proc.stderr
    choice["fold"]["held_out"] = "M08"
    choice["student_checkpoint"] = "/elsewhere/CKPT+old"
    (folder / "decoding_choice.json").write_text(json.dumps(choice))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "was chosen with the student" in proc.stderr and "Traceback" not in proc.stderr
    assert (folder / "test_results.json").read_bytes() == before
    assert not list(folder.glob("wer_test_free_*"))


def test_tune_refuses_bad_input_before_writing(world, tmp_path):  # noqa: F811
    folder, csvs = _cross_fold(world, tmp_path)
    # a teacher model not given: named
    words = world["words"]["exp"]
    cmd = [sys.executable, str(RECIPE / "tune_decoding.py"), str(folder), "--csv_folder", str(csvs)]
    proc = subprocess.run(
        cmd + ["--models", f"M08={words / 'hyperparams.yaml'}:{words / 'save'}"], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "give F05 with --models" in proc.stderr and "Traceback" not in proc.stderr
    # a speaker's CSV without a validation utterance: the speaker and the utterance named
    text = (csvs / "F02.csv").read_text().splitlines()
    (csvs / "F02.csv").write_text("\n".join(text[:2]) + "\n")
    proc = _tune(world, folder, csvs)
    assert proc.returncode == 2 and "speaker F02" in proc.stderr and "lacks validation utterance" in proc.stderr
    # a weight out of range
    proc = _tune(world, folder, csvs, "--lm_weights", "1.5")
    assert proc.returncode == 2 and "lm_weight" in proc.stderr and "Traceback" not in proc.stderr
    assert not (folder / "decoding_choice.json").exists()


def _free_results(results, fold, right, tokenizer):
    """A cross run of the rehearsal ablation as make_tables reads it: ``right`` {system: [bool per
    utterance]} for every decoding (greedy, beam_partialctc, chosen), two productions x two mics."""
    import make_tables

    from local.scoring import SystemScores

    folder = results / make_tables._ablation_cross_run("cross", "same_level", fold)
    folder.mkdir(parents=True)
    ids = [f"{fold}_B3_{w}_M{m}" for w in ("D1", "D2") for m in (5, 6)]
    words = ["ONE", "ONE", "TWO", "TWO"]
    free = {}
    for key, _ in (*make_tables.FREE_SEARCHES, make_tables.CHOSEN_SEARCH):
        systems = {}
        for name, flags in right.items():
            scores = SystemScores(tokenizer)
            hyps = [w if ok else "ZULU" for w, ok in zip(words, flags)]
            scores.append_texts(ids, hyps, words, ["D"] * 4, ["M5", "M6"] * 2)
            suffix = "" if name == "student" else f"_{name}"
            scores.write_stats(folder / f"wer_test_free_{key}{suffix}.txt")
            systems[name] = scores.summary()
        free[key] = {"systems": systems, "subset": False}
    info = {"student": {}, "data_kind": "rehearsal", "free_running": free, "teachers": ["F05", "M09"]}
    info["best_single_teacher"] = {"name": "F05"}
    (folder / "test_results.json").write_text(json.dumps(info))


def test_free_table_pools_the_folds(tmp_path, demo_tree):
    """make_tables' free-running table with the chosen decodings and a pooled row per teacher set
    and search: the pooled WRA is over every utterance of the folds, its test over every production."""
    import make_tables

    from local.store import load_tokenizer

    tokenizer = load_tokenizer(demo_tree / "tokenizer.model")
    results = tmp_path / "results"
    # M08: student right 4 of 4, vote 1 of 4; M05: student 2 of 4, vote 2 of 4
    vote08, vote05 = [True, False, False, False], [True, True, False, False]
    _free_results(
        results,
        "M08",
        {"student": [True] * 4, "majority_vote": vote08, "teacher_F05": vote08, "teacher_M09": [False] * 4},
        tokenizer,
    )
    _free_results(
        results,
        "M05",
        {"student": [True, True, False, False], "majority_vote": vote05, "teacher_F05": vote05, "teacher_M09": vote05},
        tokenizer,
    )
    decoded = (("cross", "same_level", "M08"), ("cross", "same_level", "M05"))
    table = make_tables.rehearsal_free(
        results,
        decoded,
        make_tables._ablation_cross_run,
        (*make_tables.FREE_SEARCHES, make_tables.CHOSEN_SEARCH),
        pooled=True,
    )
    rows = [line for line in table.splitlines() if line.startswith("| cross |")]
    assert len(rows) == 2 * 3 + 3  # two folds x three searches, one pooled row per search
    pooled = [r for r in rows if "| pooled |" in r]
    assert [r.split(" | ")[3] for r in pooled] == ["greedy", "beam 8 + CTC + LM", "chosen on teachers"]
    for row in pooled:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[4] == "**75.0**" and cells[7] == "37.5"  # (4 + 2) / 8 and (1 + 2) / 8
        assert cells[10].startswith("+37.5 vs vote, p ")
    m08 = next(r for r in rows if "| M08 | chosen on teachers |" in r)
    assert "**100.0**" in m08 and "| 25.0 (F05) |" in m08 and "+75.0 vs vote" in m08
    assert "*chosen on teachers*" in table and "Rehearsal corpus" in table
