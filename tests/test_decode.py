"""Free-running decoding with the student in the loop (decode.py, local/free_running.py).

Parity: with one stream and a student that passes it through (or the recipe's `mean` fusion), the
recipe's greedy and beam searches are SpeechBrain's own searches of that SA model (the fixture's
`test_search`: beam 66, CTC 0.4, a TransformerLM at 0.6, temperature 1.15), token for token, on
real speech (four words spoken by espeak-ng, tests/fixtures/audio). And for a causal student, an
exact match under teacher-forced greedy decoding is the same event as an exact match under
free-running greedy decoding. The SA model is the fixture of test_sa_experiment.py (the SA
project's yaml, its experiment folder layout), with random weights.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_sa_experiment import _build, _fixture_text, make_experiment

from conftest import RECIPE

AUDIO = Path(__file__).parent / "fixtures" / "audio"
# (utterance id, word): the espeak-ng recordings, as utterances of speaker M08
UTTERANCES = [
    ("M08_B3_D3_M5", "THREE"),
    ("M08_B3_LA_M5", "ALPHA"),
    ("M08_B3_C1_M5", "COMMAND"),
    ("M08_B3_CW7_M5", "YOU"),
]

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask:UserWarning"),
]


def _variant(root, tokenizer, sp, eos_bias, blank_bias=0.0):
    from local.sa_models import SAModel, load_language_model

    exp, ckpts = make_experiment(
        root, "M08", sp.vocab_size(), tokenizer, [0.8], 0.1, seed=4, eos_bias=eos_bias, blank_bias=blank_bias
    )
    model = SAModel("M08", exp / "hyperparams.yaml", exp / "save")
    assert model.ckpt_dir == ckpts["own0"]
    lm = load_language_model(exp / "hyperparams.yaml", exp / "save" / "lm.ckpt")
    return dict(root=root, exp=exp, model=model, lm=lm)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Fixture models on the espeak-ng words (four utterances of 21, 23, 28 and 21 encoder frames):
    ``plain`` (random weights: hypotheses that run to each utterance's own step limit, which test
    the searches' every step), ``ending`` (its </s> output raised: the greedy search ends at once),
    ``greedy_mix`` (raised less: the greedy search ends at once on some utterances and runs to its
    limit on another) and ``words`` (</s> and the CTC blank raised: beam hypotheses of 7 to 11
    pieces that end with </s>, at a different step per utterance, like a trained model's words)."""
    import soundfile

    from local.sa_models import read_speaker_csv
    from local.store import load_tokenizer
    from local.synthetic import train_tokenizer

    root = tmp_path_factory.mktemp("decode")
    tokenizer = root / "tokenizer.model"
    train_tokenizer(tokenizer, [w for _, w in UTTERANCES], 120, seed=3)
    sp = load_tokenizer(tokenizer)
    csv = root / "M08.csv"
    # the recordings' own durations: the recipe refuses a CSV duration the audio file disagrees with
    wavs = [AUDIO / (w + ".wav") for _, w in UTTERANCES]
    rows = [f"{u},{soundfile.info(f).duration},{f},M08,{w}" for (u, w), f in zip(UTTERANCES, wavs)]
    csv.write_text("ID,duration,wav,spk_id,wrd\n" + "\n".join(rows) + "\n")
    # in the order of UTTERANCES (the tests' expectations), not the CSV reader's ascending duration
    order = [u for u, _ in UTTERANCES]
    utts = sorted(read_speaker_csv(csv, "M08"), key=lambda utt: order.index(utt.id))
    variants = {
        "plain": _variant(root / "plain", tokenizer, sp, 0.0),
        "ending": _variant(root / "ending", tokenizer, sp, 2.0),
        "greedy_mix": _variant(root / "greedy_mix", tokenizer, sp, 0.8),
        "words": _variant(root / "words", tokenizer, sp, 1.0, blank_bias=5.0),
    }
    return dict(tokenizer=tokenizer, sp=sp, csv=csv, utts=utts, **variants)


def _speechbrain_reference(world, variant, beam_size=None):
    """SpeechBrain's own searches of the SA model, as the SA pipeline ran its test: the fixture's
    test_search (and a greedy searcher) on the encoder output of the model's forward pass, one
    utterance at a time (the SA pipeline's test batches held one)."""
    from speechbrain.decoders import S2STransformerGreedySearcher

    hp = _build(_fixture_text(variant["root"] / "results", world["sp"].vocab_size()))
    model = variant["model"]
    chosen = model.ckpt_dir  # checked against the expected one in the fixture
    checkpointer = type(hp["checkpointer"])(chosen.parent, recoverables=hp["checkpointer"].recoverables)
    checkpointer.load_checkpoint(checkpointer.find_checkpoint(ckpt_predicate=lambda c: c.path == chosen))
    for key in ("CNN", "Transformer", "seq_lin", "ctc_lin", "normalize"):
        hp[key].eval()
    hp["lm_model"].load_state_dict(torch.load(variant["exp"] / "save" / "lm.ckpt", weights_only=True))
    hp["lm_model"].eval()
    if beam_size is not None:
        hp["test_search"].beam_size = beam_size
    greedy = S2STransformerGreedySearcher(
        modules=[hp["Transformer"], hp["seq_lin"]], bos_index=1, eos_index=2, min_decode_ratio=0.0, max_decode_ratio=1.0
    )
    out = {"beam": [], "greedy": []}
    from local.sa_models import read_wav

    for utt in world["utts"]:
        wavs = read_wav(utt, model).unsqueeze(0)
        wav_lens = torch.ones(1)
        with torch.no_grad():
            feats = hp["normalize"](hp["compute_features"](wavs), wav_lens)
            enc_out, _ = hp["Transformer"](hp["CNN"](feats), torch.ones(1, 1, dtype=torch.long), wav_lens, pad_idx=0)
            out["beam"].append(list(hp["test_search"](enc_out, wav_lens)[0][0]))
            out["greedy"].append(list(greedy(enc_out, wav_lens)[0][0]))
    return out


def _recipe_search(world, variant, search, student):
    from local.free_running import StreamDecoder, build_searcher, encode, search_settings
    from local.sa_models import read_wav

    settings, source = search_settings(variant["exp"] / "hyperparams.yaml")
    assert source["beam_size"] == "test_beam_size" and settings["beam_size"] == 66
    assert settings["temperature"] == 1.15 and settings["ctc_weight"] == 0.4 and settings["lm_weight"] == 0.6
    decoder = StreamDecoder([variant["model"]], student)
    searcher = build_searcher(search, decoder, settings, 1, 2, variant["lm"])
    hyps = []
    for utt in world["utts"]:
        enc = encode([variant["model"]], read_wav(utt, variant["model"]))
        with torch.no_grad():
            hyps.append(list(searcher(enc, torch.ones(1))[0][0]))
    return hyps


def test_one_stream_searches_are_speechbrains(world):
    from local.free_running import StreamIdentity
    from local.fusion import FusionStudent

    mean = FusionStudent("mean", world["sp"].vocab_size(), 16).eval()
    for label in ("plain", "ending"):
        variant = world[label]
        reference = _speechbrain_reference(world, variant)
        for search in ("greedy", "beam"):
            if label == "plain":  # the searches produce pieces (the ending model's greedy ends at once)
                assert any(len(h) > 0 for h in reference[search]), search
            assert _recipe_search(world, variant, search, StreamIdentity()) == reference[search], (label, search)
            assert _recipe_search(world, variant, search, mean) == reference[search], (label, search, "mean")


def test_teacher_forced_exact_match_is_free_running_exact_match(world):
    """A causal student (the recipe's transformer fusion, random weights, so that it is not the
    identity): per utterance and reference, teacher-forced greedy is exact iff free-running greedy
    is. References: the word, and for a non-empty free-running hypothesis the hypothesis itself and
    two near misses sharing its prefix (last piece changed, one piece added), as token ids
    (SentencePiece's text round trip would add a word-boundary piece)."""
    from local.free_running import StreamDecoder, build_searcher, encode, search_settings
    from local.fusion import FusionStudent
    from local.sa_models import read_wav
    from local.scoring import greedy_ids

    torch.manual_seed(0)
    student = FusionStudent("transformer", world["sp"].vocab_size(), 16, d_model=16, n_heads=2, n_layers=1).eval()
    with torch.no_grad():  # a correction that changes the argmax somewhere (it starts at zero)
        student.fusion.correction[1].weight.normal_(0, 0.5)
    variant = world["ending"]
    decoder = StreamDecoder([variant["model"]], student)
    settings, _ = search_settings(variant["exp"] / "hyperparams.yaml")
    greedy = build_searcher("greedy", decoder, settings, 1, 2)
    sp, model = world["sp"], variant["model"]
    outcomes = []
    for utt in world["utts"]:
        wav = read_wav(utt, model)
        with torch.no_grad():
            free = list(greedy(encode([model], wav), torch.ones(1))[0][0])
        # references as token ids: the free-running hypothesis itself (exact), the same with its
        # last piece changed or one piece added (near misses: the same prefix), and the word
        alt = lambda t: 4 if t != 4 else 5  # noqa: E731 - another piece
        references = [sp.encode_as_ids(utt.word)]
        if free:
            references += [free, free[:-1] + [alt(free[-1])], free + [alt(free[-1])]]
        for ref_ids in references:
            decoder_logits, _ = model.logits(wav, ref_ids)  # teacher-forced on [<s>] + reference
            with torch.no_grad():
                out = student(decoder_logits[None, None], torch.ones(1, 1, dtype=torch.bool), decoder.stream_ids[None])
            forced = greedy_ids(out, torch.tensor([len(ref_ids) + 1]))[0]  # argmax, cut at </s>
            outcomes.append((forced == ref_ids, free == ref_ids))
    assert all(tf == fr for tf, fr in outcomes), outcomes
    assert {fr for _, fr in outcomes} == {True, False}, outcomes  # both outcomes are tested
    assert sum(fr for _, fr in outcomes) >= 1 and sum(not fr for _, fr in outcomes) >= 3


def _fold_folder(world, tmp_path, input_streams="matched", teachers=("F05",)):
    """A fold's output folder as train.py leaves it (test_results.json, hyperparams.yaml, save/)."""
    from speechbrain.utils.checkpoints import Checkpointer

    from local.fusion import FusionStudent

    folder = tmp_path / "fold"
    torch.manual_seed(1)
    student = FusionStudent("transformer", world["sp"].vocab_size(), 16, d_model=16, n_heads=2, n_layers=1)
    Checkpointer(folder / "save", recoverables={"student": student}).save_checkpoint(meta={"loss": 1.0})
    (folder / "hyperparams.yaml").write_text(
        "student: !name:local.fusion.FusionStudent\n  fusion: transformer\n  d_model: 16\n  n_heads: 2\n  n_layers: 1\n"
    )
    info = {
        "held_out": "M08",
        "group": "high",
        "teachers": list(teachers),
        "teacher_set": "explicit",
        "input_streams": input_streams,
        "fusion": "transformer",
        "tokenizer_file": str(world["tokenizer"]),
        "synthetic_data": False,
        "teacher_accuracy": {m: 0.5 + 0.1 * i for i, m in enumerate(teachers)},
        "decoding": "teacher-forced greedy",
        "wer_files": {"wer_test.txt": {"system": "student", "decoding": "teacher-forced greedy"}},
        "student": {"WER": 50.0},
        "n_utterances": len(UTTERANCES),
    }
    (folder / "test_results.json").write_text(json.dumps(info))
    (folder / "test_utterances.json").write_text(json.dumps({"ids": [u for u, _ in UTTERANCES]}))
    return folder


def run_decode(world, folder, *extra, extra_models=()):
    cmd = [
        sys.executable,
        str(RECIPE / "decode.py"),
        str(folder),
        "--models",
        f"M08={world['ending']['exp'] / 'hyperparams.yaml'}:{world['ending']['exp'] / 'save'}",
        *extra_models,
        "--speaker_csv",
        str(world["csv"]),
        "--device",
        "cpu",
        "--noprogressbar",
        *extra,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def test_decode_a_fold(world, tmp_path):
    """decode.py on a fold folder: wer_test_free_<key>*.txt in SpeechBrain's format, a free_running
    block that says how each figure was decoded, compare.py reading it; a second run refused
    without --force; a missing test-stream model named."""
    folder = _fold_folder(world, tmp_path)
    proc = run_decode(world, folder, "--search", "greedy", "beam", "--beam_size=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads((folder / "test_results.json").read_text())
    beam = info["free_running"]["beam"]
    assert "beam 4" in beam["decoding"] and "TransformerLM 0.6" in beam["decoding"] and "CTC 0.4" in beam["decoding"]
    assert beam["settings"]["beam_size"] == 4 and beam["settings_from"]["ctc_weight"] == "ctc_weight_decode"
    assert beam["lm_file"].endswith("lm.ckpt")
    for search in ("greedy", "beam"):
        systems = info["free_running"][search]["systems"]
        assert set(systems) == {"student", "sa_self"} and systems["student"]["n"] == len(world["utts"])
        covered = info["free_running"][search]["test_utterances"]
        assert covered == {"decoded": 4, "fold_test_utterances": 4, "complete": True}
        for name in systems:
            file = f"wer_test_free_{search}.txt" if name == "student" else f"wer_test_free_{search}_{name}.txt"
            assert info["wer_files"][file]["decoding"] == info["free_running"][search]["decoding"]
            assert (folder / file).read_text().startswith("%WER")
    assert info["wer_files"]["wer_test.txt"]["decoding"] == "teacher-forced greedy"  # kept
    assert "fold M08: free-running decodes of its audio (all 4 test utterances of the fold)" in proc.stdout
    # compare.py reads how each file was decoded, and says when two decodings differ
    files = [folder / f"wer_test_free_{n}.txt" for n in ("beam", "beam_sa_self", "greedy")]
    cmp = subprocess.run(
        [sys.executable, str(RECIPE / "compare.py"), *map(str, files), "--n_boot", "50", "--n_perm", "50"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert cmp.returncode == 0, cmp.stderr[-2000:]
    assert "free-running joint CTC/attention beam search" in cmp.stdout and "free-running greedy" in cmp.stdout
    assert "WARNING" in cmp.stdout  # greedy and beam decodes side by side

    proc = run_decode(world, folder, "--search", "greedy")
    assert proc.returncode == 2 and "already has the greedy decoding" in proc.stderr and "Traceback" not in proc.stderr
    # cross, two teachers' models as the test streams (two different models: the encoder states are
    # split, the CTC posteriors averaged); each alone, their mean and their vote too
    cross = _fold_folder(world, tmp_path / "x", input_streams="cross", teachers=("M08", "F05"))
    plain = world["plain"]["exp"]
    proc = run_decode(
        world,
        cross,
        "--search",
        "greedy",
        "beam",
        "--beam_size=3",
        extra_models=[f"F05={plain / 'hyperparams.yaml'}:{plain / 'save'}"],
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((cross / "test_results.json").read_text())["free_running"]
    for search in ("greedy", "beam"):
        systems = results[search]["systems"]
        assert set(systems) == {"student", "sa_self", "mean", "teacher_M08", "teacher_F05", "majority_vote"}
        assert results[search]["systems_decoded"] == 5 and results[search]["search_seconds"] > 0
    assert systems["teacher_M08"] == systems["sa_self"]  # M08's model, the same search
    assert systems["teacher_F05"] != systems["teacher_M08"]  # two different models
    # --force redoes a search; without it a second run is refused (checked above)
    proc = run_decode(world, folder, "--search", "greedy", "--force")
    assert proc.returncode == 0, proc.stderr[-2000:]
    # a mistyped hparams path: one line
    proc = run_decode(world, folder, "--search", "greedy", "--force", extra_models=["F05=/nonexistent/h.yaml:/x"])
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr
    # a test-stream model that is not given: one line naming it, nothing written
    other = _fold_folder(world, tmp_path / "y", input_streams="cross")
    info = json.loads((other / "test_results.json").read_text())
    (other / "test_results.json").write_text(json.dumps({**info, "teachers": ["M08", "M09"]}))
    before = (other / "test_results.json").read_text()
    proc = run_decode(world, other, "--search", "greedy")
    assert proc.returncode == 2 and "give M09 with --models" in proc.stderr and "Traceback" not in proc.stderr
    assert (other / "test_results.json").read_text() == before
    assert not list(other.glob("wer_test_free_greedy*"))


def test_batched_searches_are_a_batch_of_one(world):
    """Four utterances of different lengths decoded in one batch get, token for token, the
    hypotheses each gets alone: greedy and beam (CTC scored in full and partially, TransformerLM),
    on models whose hypotheses end at different steps per utterance or run to each utterance's own
    step limit. What makes it so is checked to matter: SpeechBrain's searchers on the same padded
    batch run every utterance to the longest one's limit, and a padded batch through the conformer
    without the masked convolutions changes the shorter utterances' encoder outputs."""
    from speechbrain.decoders import S2STransformerGreedySearcher

    from local.free_running import OutputIdentity, StreamDecoder, StreamIdentity, build_searcher, search_settings
    from local.sa_models import read_wav

    lengths = {}
    for label, searches in (("plain", ("greedy", "beam")), ("greedy_mix", ("greedy",)), ("words", ("beam",))):
        variant = world[label]
        model = variant["model"]
        wavs = [read_wav(u, model) for u in world["utts"]]
        enc, frames = model.encode_batch(wavs)
        assert len(set(frames.tolist())) == 3  # different lengths in one batch
        for i, wav in enumerate(wavs):
            torch.testing.assert_close(enc[i, : frames[i]], model.encode(wav)[0], rtol=0, atol=1e-5)
        settings, _ = search_settings(variant["exp"] / "hyperparams.yaml")
        decoder = StreamDecoder([model], StreamIdentity())
        wav_lens = frames.double() / frames.max()
        for search in searches:
            for scoring in ("full", "partial") if search == "beam" else ("full",):
                searcher = build_searcher(search, decoder, settings, 1, 2, variant["lm"], ctc_scoring=scoring)
                with torch.no_grad():
                    alone = [list(searcher(model.encode(w), torch.ones(1))[0][0]) for w in wavs]
                    together = [list(h) for h in searcher(enc, wav_lens)[0]]
                assert together == alone, (label, search, scoring)
                lengths[(label, search, scoring)] = [len(h) for h in alone]
        if label == "plain":
            # SpeechBrain's greedy searcher on the same padded batch: the shorter utterances run on
            # to the longest one's step limit
            plain = S2STransformerGreedySearcher(
                modules=[decoder, OutputIdentity(decoder.vocab_size)], bos_index=1, eos_index=2,
                min_decode_ratio=0.0, max_decode_ratio=1.0,
            )  # fmt: skip
            with torch.no_grad():
                assert [len(h) for h in plain(enc, wav_lens)[0]] != lengths[(label, "greedy", "full")]
            # the encoder on the padded batch, the padding not masked before the convolutions
            transformer = model.modules["Transformer"]
            src = torch.nn.utils.rnn.pad_sequence([model.front_end(w) for w in wavs], batch_first=True)
            with torch.no_grad():
                leaky = transformer.encode(src, wav_lens, pad_idx=0)
            shortest = int(frames.argmin())
            assert (leaky[shortest, : frames[shortest]] - enc[shortest, : frames[shortest]]).abs().max() > 1e-3
    assert lengths[("plain", "greedy", "full")] == [21, 23, 28, 21]  # each utterance's own limit
    assert lengths[("plain", "beam", "full")] == [20, 22, 27, 20]  # filled at its own last step
    assert sorted(set(lengths[("greedy_mix", "greedy", "full")])) == [0, 23]  # ended, or its own limit
    assert len(set(lengths[("words", "beam", "full")])) >= 3 and max(lengths[("words", "beam", "full")]) < 20


def test_prefix_score_is_speechbrains():
    """The CTC prefix scorer without per-row loops gives SpeechBrain's numbers and states, step after
    step, with full and with partial scoring (utterances of different lengths, beams permuted)."""
    from speechbrain.decoders.ctc import CTCPrefixScore

    from local.free_running import PrefixScore

    torch.manual_seed(0)
    batch, beam, frames, vocab = 3, 4, 9, 12
    x = torch.log_softmax(torch.randn(batch, frames, vocab), -1)
    lens = torch.tensor([9, 6, 7])
    for partial in (False, True):
        ours, theirs = PrefixScore(x.clone(), lens, 0, 2), CTCPrefixScore(x.clone(), lens, 0, 2)
        state_ours = state_theirs = None
        tokens = torch.full((batch * beam,), 1, dtype=torch.long)
        for _ in range(4):
            candidates = torch.randn(batch * beam, vocab).topk(5, -1).indices if partial else None
            score_ours, state_ours = ours.forward_step(tokens, state_ours, candidates)
            score_theirs, state_theirs = theirs.forward_step(tokens, state_theirs, candidates)
            assert torch.equal(score_ours, score_theirs)
            for a, b in zip(state_ours, state_theirs):
                assert (a is None and b is None) or torch.equal(a, b)
            # the beams' next tokens: the best few of the scores, per utterance, as the searcher picks them
            best = score_theirs.view(batch, -1).topk(beam, -1).indices
            state_ours = ours.permute_mem(state_ours, best)
            state_theirs = theirs.permute_mem(state_theirs, best)
            for a, b in zip(state_ours, state_theirs):
                assert torch.equal(a, b)
            tokens = (best % vocab).view(-1)


def _cross_command(world, folder, *extra, launcher=(sys.executable,)):
    """decode.py on a cross fold of two different models: M08 (``words``) and F05 (``plain``)."""
    words, plain = world["words"]["exp"], world["plain"]["exp"]
    return [
        *launcher,
        str(RECIPE / "decode.py"),
        str(folder),
        "--models",
        f"M08={words / 'hyperparams.yaml'}:{words / 'save'}",
        f"F05={plain / 'hyperparams.yaml'}:{plain / 'save'}",
        "--speaker_csv",
        str(world["csv"]),
        "--device",
        "cpu",
        "--noprogressbar",
        "--search",
        "greedy",
        "beam",
        "--beam_size=4",
        *extra,
    ]


def _outputs(folder):
    """The decode's output files (bytes) and its figures, without what says how long it took."""
    files = {p.name: p.read_bytes() for p in sorted(folder.glob("wer_test_free_*.txt"))}
    results = json.loads((folder / "test_results.json").read_text())["free_running"]
    figures = {
        k: {n: s for n, s in r.items() if n in ("decoding", "systems", "test_utterances")} for k, r in results.items()
    }
    return files, figures


def test_batches_and_a_killed_run_give_the_files_of_one_by_one(world, tmp_path):
    """decode.py on the SA folder layout, a cross fold of two different models (the student, each
    teacher, their mean and vote): batches of 4 give the files of batches of 1, byte for byte; a run
    killed (SIGKILL) after its first batch resumes from its saved batches, decodes only the rest,
    and ends with the same files (its saved batches removed)."""
    import signal
    import time

    one = _fold_folder(world, tmp_path / "one", input_streams="cross", teachers=("M08", "F05"))
    proc = subprocess.run(_cross_command(world, one, "--batch_size=1"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = _outputs(one)
    assert len(expected[0]) == 12  # greedy and beam: student, sa_self, mean, 2 teachers, vote
    assert not (one / ".free_running_partial").exists()

    four = _fold_folder(world, tmp_path / "four", input_streams="cross", teachers=("M08", "F05"))
    proc = subprocess.run(_cross_command(world, four, "--batch_size=4"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _outputs(four) == expected

    killed = _fold_folder(world, tmp_path / "killed", input_streams="cross", teachers=("M08", "F05"))
    partial = killed / ".free_running_partial"
    first = subprocess.Popen(
        _cross_command(world, killed, "--batch_size=1"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.time() + 300
        while not list(partial.glob("batch-*.json")) and first.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        first.send_signal(signal.SIGKILL)
    finally:
        first.wait(timeout=60)
    assert first.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    saved = len(list(partial.glob("batch-*.json")))
    assert 1 <= saved < 4
    assert "free_running" not in json.loads((killed / "test_results.json").read_text())  # nothing reported
    proc = subprocess.run(_cross_command(world, killed, "--batch_size=1"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming: {saved} of 4 utterances already decoded" in proc.stderr
    results = json.loads((killed / "test_results.json").read_text())["free_running"]
    assert results["beam"]["utterances_decoded_by_this_run"] == 4 - saved
    assert _outputs(killed) == expected
    assert not partial.exists()


def test_torchrun_two_processes_write_the_files_of_one(world, tmp_path):
    """Under torchrun (2 CPU processes, gloo) the batches are shared out and the main process writes
    the same files as one process, hypothesis for hypothesis."""
    one = _fold_folder(world, tmp_path / "one", input_streams="cross", teachers=("M08", "F05"))
    proc = subprocess.run(_cross_command(world, one, "--batch_size=1"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = _fold_folder(world, tmp_path / "two", input_streams="cross", teachers=("M08", "F05"))
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        _cross_command(world, two, "--batch_size=1", "--distributed_backend=gloo", launcher=launcher),
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _outputs(two) == _outputs(one)
    results = json.loads((two / "test_results.json").read_text())["free_running"]
    assert results["beam"]["processes"] == 2 and results["beam"]["utterances_decoded_by_this_run"] == 4
    assert proc.stdout.count("fold M08: free-running decodes") == 1  # the main process reports
    assert not (two / ".free_running_partial").exists()


def _snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_bad_options_and_inputs_stop_before_anything_is_written(world, tmp_path, capsys):
    """Every numeric option checked for finiteness and range, and the other bad inputs (a CSV with
    only some of the fold's test utterances, an empty CSV, a corrupt .wav, a device this machine
    lacks): one ``ERROR:`` line naming the option or the file, exit status 2, the folder untouched."""
    import decode

    folder = _fold_folder(world, tmp_path)
    before = _snapshot(folder)
    exp = world["ending"]["exp"]
    base = [str(folder), "--models", f"M08={exp / 'hyperparams.yaml'}:{exp / 'save'}", "--noprogressbar"]

    def refused(csv, *options, words=()):
        code = decode.main([*base, "--speaker_csv", str(csv), *options])
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("ERROR:")]
        assert code == 2 and len(lines) == 1 and "Traceback" not in err, (options, err)
        assert all(w in lines[0] for w in words), (lines[0], words)
        assert _snapshot(folder) == before, options

    csv = world["csv"]
    for option, value in [
        ("temperature", "nan"),
        ("temperature", ".inf"),
        ("temperature", "inf"),
        ("temperature", "-1"),
        ("lm_temperature", "0"),
        ("beam_size", "-1"),
        ("beam_size", "2.5"),
        ("beam_size", "nan"),
        ("ctc_weight", "1.0"),
        ("ctc_weight", "nan"),
        ("lm_weight", "1.5"),
        ("lm_weight", "-inf"),
        ("max_decode_ratio", "0"),
        ("max_decode_ratio", "inf"),
        ("min_decode_ratio", "-0.5"),
        ("batch_size", "0"),
        ("batch_size", "nan"),
        ("max_memory", "nan"),
        ("max_memory", "-2"),
        ("scorer_beam_scale", "inf"),
    ]:
        refused(csv, f"--{option}={value}", words=(f"--{option}={value} is not allowed",))
    refused(csv, "--min_decode_ratio=2", words=("--min_decode_ratio=2.0 is not allowed", "below max_decode_ratio"))
    refused(csv, "--ctc_source=M99", "--search", "beam", words=("--ctc_source=M99 is not allowed",))
    refused(csv, "--ctc_source=mean", words=("--ctc_source=mean is not allowed with the greedy search",))
    refused(csv, "--precision=fp16", "--device=cpu", words=("--precision=fp16 is not allowed",))
    refused(csv, "--lm_file=missing.ckpt", words=("--lm_file=missing.ckpt is not allowed", "does not exist"))
    for device in ["cuda:99", "tpu"] + ([] if torch.cuda.is_available() else ["cuda"]):
        refused(csv, f"--device={device}", words=(f"--device={device} is not allowed",))
    with pytest.raises(SystemExit) as stop:
        decode.main([*base, "--speaker_csv", str(csv), "--temprature=2"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith("ERROR:") and "--temprature" in err and len(err.splitlines()) == 1

    # the CSV: two of the fold's four test utterances (refused unless --subset), empty, a corrupt .wav
    rows = world["csv"].read_text().splitlines()
    half = tmp_path / "half.csv"
    half.write_text("\n".join(rows[:3]) + "\n")
    refused(half, words=(str(half), "holds 2 of the fold's 4 test utterances", "--subset"))
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    refused(empty, words=(str(empty), "is empty"))
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF" + bytes(range(200)))
    corrupt = tmp_path / "corrupt.csv"
    corrupt.write_text("\n".join([rows[0], *rows[1:4], rows[4].replace(str(AUDIO / "YOU.wav"), str(bad))]) + "\n")
    refused(corrupt, words=(str(bad), "M08_B3_CW7_M5", "unreadable audio file"))

    # --subset: decoded, and said to be a subset in the results, the files' decoding and the console
    code = decode.main([*base, "--speaker_csv", str(half), "--search", "greedy", "--subset"])
    out = capsys.readouterr().out
    assert code == 0
    result = json.loads((folder / "test_results.json").read_text())["free_running"]["greedy"]
    assert result["subset"] is True
    assert result["test_utterances"] == {"decoded": 2, "fold_test_utterances": 4, "complete": False}
    assert "[SUBSET: 2 of the fold's 4 test utterances]" in result["decoding"]
    assert result["systems"]["student"]["n"] == 2
    assert "SUBSET: 2 of the fold's 4 test utterances" in out


def test_train_py_decodes_the_test_audio_when_given_the_models(demo_tree, tmp_path):
    """train.py with --models (and the held-out speaker's CSV) ends its test with decode.py's
    free-running decode of the fold's test utterances, in files named for how they were decoded
    beside the teacher-forced ones; --models without the CSV is refused before training."""
    import soundfile

    from conftest import TEST_CACHE

    meta = json.loads((demo_tree / "logit_extraction" / "M08" / "M08" / "M08_metadata.json").read_text())
    exp, _ = make_experiment(
        tmp_path / "sa", "M08", meta["vocab_size"], demo_tree / "tokenizer.model", [0.8], 0.1, seed=4, eos_bias=2.0
    )
    audio, rows = tmp_path / "audio", []
    audio.mkdir()
    generator = torch.Generator().manual_seed(0)
    for i, (utt, word) in enumerate(zip(meta["utterance_ids"], meta["target_words"])):
        n = 3200 + 160 * (i % 20)  # 0.2-0.4 s
        soundfile.write(audio / f"{utt}.wav", (0.1 * torch.randn(n, generator=generator)).numpy(), 16000)
        rows.append(f"{utt},{n / 16000},$data_root/{utt}.wav,M08,{word}")
    csv = tmp_path / "M08.csv"
    csv.write_text("ID,duration,wav,spk_id,wrd\n" + "\n".join(rows) + "\n")
    out = tmp_path / "fold"
    cmd = [
        sys.executable,
        str(RECIPE / "train.py"),
        str(RECIPE / "hparams" / "fold_M08.yaml"),
        f"--output_folder={out}",
        f"--demo_folder={demo_tree}",
        f"--cache_folder={TEST_CACHE}",
        "--number_of_epochs=1",
        "--d_model=16",
        "--d_ffn=32",
        "--n_layers=1",
        "--noprogressbar",
        f"--models={{M08: {exp / 'hyperparams.yaml'}:{exp / 'save'}}}",
        f"--speaker_csv={csv}",
        f"--data_root={audio}",
        "--free_running=[greedy]",
    ]
    proc = subprocess.run(cmd, cwd=RECIPE, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads((out / "test_results.json").read_text())
    greedy = info["free_running"]["greedy"]
    assert greedy["test_utterances"] == {"decoded": 308, "fold_test_utterances": 308, "complete": True}
    assert set(greedy["systems"]) == {"student", "sa_self"}
    assert info["wer_files"]["wer_test_free_greedy.txt"]["decoding"].startswith("free-running greedy")
    assert info["wer_files"]["wer_test.txt"]["decoding"].startswith("teacher-forced")
    assert (out / "wer_test_free_greedy.txt").read_text().startswith("%WER")
    assert "fold M08: free-running decodes of its audio (all 308 test utterances of the fold)" in proc.stdout
    # --models without the CSV: refused before training
    keep = [a for a in cmd if not a.startswith(("--output_folder", "--speaker_csv", "--data_root"))]
    bad = subprocess.run(
        [*keep, f"--output_folder={tmp_path / 'other'}"], cwd=RECIPE, capture_output=True, text=True, timeout=300
    )
    assert bad.returncode != 0 and "--models is given without --speaker_csv" in bad.stderr
    assert not (tmp_path / "other").exists()


def test_ctc_source_and_partial_scoring_are_decodings_of_their_own(world, tmp_path):
    """--ctc_source=MODEL decodes every system with that model's CTC (a teacher alone with its own
    CTC is then its default decode; another is not), --ctc_source=mean with the test streams' mean,
    --ctc_scoring=partial scores CTC on the best candidates: each a decoding of its own name, beside
    the default one, its files listed with it. An earlier version's files of a redone decoding go.
    The memory a search needs is printed, and a --max_memory budget cuts the batches."""
    folder = _fold_folder(world, tmp_path, input_streams="cross", teachers=("M08", "F05"))
    legacy = folder / "wer_test_beam_mean.txt"  # an earlier version's name for the beam decode of `mean`
    legacy.write_text("%WER 1.00\n")
    info = json.loads((folder / "test_results.json").read_text())
    info["wer_files"]["wer_test_beam_mean.txt"] = {"system": "mean", "decoding": "free-running joint CTC/attention"}
    info["free_running"] = {"beam": {"decoding": "an earlier version's"}}
    (folder / "test_results.json").write_text(json.dumps(info))
    for extra in (["--max_memory=0.0001"], ["--ctc_source=F05"], ["--ctc_source=mean", "--ctc_scoring=partial"]):
        command = _cross_command(
            world, folder, "--batch_size=4", "--force", "--search", "beam", "--beam_size=3", *extra
        )
        proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        # the memory a search needs, printed, and the batches cut to --max_memory (here: to one utterance)
        assert "memory of a search per utterance" in proc.stderr and "CTC prefix scorer" in proc.stderr
        assert f"batches of up to {1 if '--max_memory=0.0001' in extra else 4} utterance(s)" in proc.stderr
    info = json.loads((folder / "test_results.json").read_text())
    results = info["free_running"]
    assert set(results) == {"beam", "beam_ctc-F05", "beam_partialctc_ctc-mean"}
    assert not legacy.exists() and "wer_test_beam_mean.txt" not in info["wer_files"]
    own, f05 = results["beam"]["systems"], results["beam_ctc-F05"]["systems"]
    assert f05["teacher_F05"] == own["teacher_F05"]  # F05's own CTC either way
    assert f05["teacher_M08"] != own["teacher_M08"]  # M08's decoder with F05's CTC
    assert "CTC 0.4 from F05" in results["beam_ctc-F05"]["decoding"]
    assert "partial" in results["beam_partialctc_ctc-mean"]["decoding"]
    assert results["beam_partialctc_ctc-mean"]["ctc_source"] == "mean"
    for key in results:
        files = [f for f, e in info["wer_files"].items() if e.get("free_running") == key]
        assert len(files) == 6 and all((folder / f).is_file() for f in files), key


def test_new_position_only_equals_the_whole_prefix(world):
    """The SA decoder and the TransformerLM run on the new position only (keeping what their layers
    read of the earlier ones) give the outputs of SpeechBrain's call on the whole prefix, step after
    step, with the hypotheses reordered between steps as a beam search reorders them."""
    from local.incremental import LastPositionDecoder, decoder_supported, lm_last_position, lm_supported
    from local.sa_models import read_wav

    variant = world["plain"]
    model, lm = variant["model"], variant["lm"]
    transformer = model.modules["Transformer"]
    assert decoder_supported(transformer) and lm_supported(lm)
    wavs = [read_wav(u, model) for u in world["utts"]]
    enc, frames = model.encode_batch(wavs)
    rows = 3 * len(wavs)  # three hypotheses per utterance
    enc = enc.repeat_interleave(3, 0)
    enc_len = frames.repeat_interleave(3, 0)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.ones(rows, 1, dtype=torch.long)
    step, keys = LastPositionDecoder(transformer), None
    with torch.no_grad():
        for t in range(6):
            if t:  # reorder the hypotheses within each utterance, then extend them
                index = (torch.arange(rows) // 3) * 3 + torch.randint(3, (rows,), generator=generator)
                step.permute(index)
                keys = [k.index_select(0, index) for k in keys]
                tokens = torch.cat([tokens[index], torch.randint(3, 40, (rows, 1), generator=generator)], 1)
            whole, _ = transformer.decode(tokens, enc, enc_len)
            new, _ = step(tokens, enc, enc_len)
            torch.testing.assert_close(new[:, -1], whole[:, -1], rtol=1e-5, atol=1e-5)
            lm_new, keys = lm_last_position(lm, tokens, keys)
            torch.testing.assert_close(lm.output_proj(lm_new)[:, -1], lm(tokens)[:, -1], rtol=1e-5, atol=1e-5)
    assert tokens.shape[1] == 6


def test_decode_utterances_for_a_corpus_build(world, tmp_path):
    """The reusable batched search (free_running.decode_utterances) on plain decodes of single SA
    models: each model's hypotheses are SpeechBrain's own search of it, utterance by utterance, and
    write_wer_file writes them as a SpeechBrain wer_*.txt file that reads back with its figures."""
    from local.free_running import decode_utterances, search_settings, single_model_systems, write_wer_file
    from local.sa_models import SAModel
    from local.wer_files import read_wer_file

    models = {n: SAModel(n, world[v]["exp"] / "hyperparams.yaml", world[v]["exp"] / "save") for n, v in
              (("A", "words"), ("B", "greedy_mix"))}  # fmt: skip
    settings, _ = search_settings(world["words"]["exp"] / "hyperparams.yaml")
    settings["beam_size"] = 4
    lm = world["words"]["lm"]
    hyps = decode_utterances(
        world["utts"], single_model_systems(models), ("greedy", "beam"), settings, lm, batch_size=3, progress=False
    )
    reference = _speechbrain_reference(world, world["words"], beam_size=4)
    assert [hyps["beam"]["A"][u.id] for u in world["utts"]] == reference["beam"]
    reference = _speechbrain_reference(world, world["greedy_mix"])
    assert [hyps["greedy"]["B"][u.id] for u in world["utts"]] == reference["greedy"]
    summary = write_wer_file(tmp_path / "wer_M08.txt", world["utts"], hyps["beam"]["A"], world["sp"])
    parsed = read_wer_file(tmp_path / "wer_M08.txt")
    assert parsed.n == 4 and not parsed.mismatches and parsed.metrics()["WER"] == summary["WER"]
    assert sorted(parsed.ids) == sorted(u.id for u in world["utts"])
