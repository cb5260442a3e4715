"""End to end: extract_logits.py on tiny SA models (hparams/sa_model_tiny.yaml), on CPU.

Two randomly initialised models of the SA architecture family, saved with SpeechBrain's
Checkpointer in the real layout (save/CKPT+*/model.ckpt, normalizer.ckpt, ...), run on generated
audio of two speakers (every model on every speaker); the written tree must be what the recipe's
store reads, hold the teacher-forced logits of a direct forward pass, and be skipped when finished.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from local.layout import METADATA_KEYS

from conftest import RECIPE

TINY = RECIPE / "hparams" / "sa_model_tiny.yaml"
SCRIPT = RECIPE / "extract_logits.py"

# (word key, word, mics): the mics of one word share a duration, as in UASpeech.
WORDS = [("D3", "THREE", ("M5", "M6")), ("LA", "ALPHA", ("M5",)), ("C1", "COMMAND", ("M6",)), ("CW7", "YOU", ("M5",))]
SPEAKERS = ("F02", "M05")
MODELS = ("F02", "M05")
SYNTHETIC_VOCAB = 120

# SpeechBrain's TransformerASR gives torch a bool padding mask and a float look-ahead mask.
pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask:UserWarning"),
]


def _write_audio(folder, speaker, seed):
    """Short 16 kHz wavs (a tone plus noise) and a SpeechBrain CSV with $data_root paths."""
    import soundfile

    gen = np.random.default_rng(seed)
    rows = []
    for key, word, mics in WORDS:
        seconds = float(gen.uniform(0.25, 0.6))
        n = int(16000 * seconds)
        for mic in mics:
            utt_id = f"{speaker}_B3_{key}_{mic}"
            t = np.arange(n) / 16000.0
            wav = 0.3 * np.sin(2 * np.pi * gen.uniform(120, 400) * t) + 0.05 * gen.standard_normal(n)
            rel = Path("audio") / speaker / f"{utt_id}.wav"
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            soundfile.write(folder / rel, wav.astype("float32"), 16000, subtype="PCM_16")
            rows.append((utt_id, n / 16000.0, f"$data_root/{rel.as_posix()}", speaker, word))
    csv = folder / f"{speaker}.csv"
    csv.write_text("ID,duration,wav,spk_id,wrd\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))
    # Ascending duration, ties in CSV order (SpeechBrain's filtered_sorted).
    order = [r for _, r in sorted(enumerate(rows), key=lambda x: (x[1][1], x[0]))]
    return csv, [(r[0], folder / r[2].replace("$data_root/", ""), r[4]) for r in order]


def _load_tiny(vocab, save_folder, seed=7775):
    from hyperpyyaml import load_hyperpyyaml

    with open(TINY, encoding="utf-8") as handle:
        overrides = {"output_neurons": vocab, "save_folder": str(save_folder), "seed": seed}
        return load_hyperpyyaml(handle, overrides)


def _build_model(save_folder, vocab, seed, was):
    """Saves one checkpoint per WRA value in ``was`` (oldest first), perturbing the weights in
    between; returns their CKPT+ folders."""
    hp = _load_tiny(vocab, save_folder, seed)
    norm = hp["normalize"]
    norm.train()
    norm(2.0 * torch.randn(3, 40, 80) + 1.0, torch.ones(3))  # the global stats, as after training
    norm.eval()
    folders = []
    for i, wra in enumerate(was):
        ckpt = hp["checkpointer"].save_checkpoint(
            meta={"ACC": 0.5, "WER": 100.0 * (1 - wra), "WRA": wra, "epoch": i + 1}
        )
        folders.append(Path(ckpt.path))
        with torch.no_grad():
            for p in hp["model"].parameters():
                p.add_(0.1 * torch.randn_like(p))
    return folders


def _load_checkpoint(ckpt_dir, vocab):
    """The tiny model loaded from one CKPT+ folder by SpeechBrain's Checkpointer, in eval mode."""
    hp = _load_tiny(vocab, ckpt_dir.parent)
    ckpt = hp["checkpointer"].find_checkpoint(ckpt_predicate=lambda c: Path(c.path) == ckpt_dir)
    hp["checkpointer"].load_checkpoint(ckpt)
    for key in ("CNN", "Transformer", "seq_lin", "ctc_lin", "normalize"):
        hp[key].eval()
    return hp


def _reference(hp, wav_path, word, sp):
    """The teacher-forced forward pass of the SA recipe, computed here: (decoder, CTC) logits."""
    import speechbrain as sb

    wavs = sb.dataio.dataio.read_audio(str(wav_path)).unsqueeze(0)
    wav_lens = torch.ones(1)
    tokens_bos = torch.LongTensor([[1] + sp.encode_as_ids(word)])
    with torch.no_grad():
        feats = hp["normalize"](hp["compute_features"](wavs), wav_lens)
        enc_out, pred = hp["Transformer"](hp["CNN"](feats), tokens_bos, wav_lens, pad_idx=0)
        return hp["seq_lin"](pred)[0], hp["ctc_lin"](enc_out)[0]


def _shared_or_none(request):
    try:
        return request.getfixturevalue("shared_uaspeech")
    except pytest.skip.Exception:
        return None


@pytest.fixture(scope="module")
def world(request, tmp_path_factory):
    """Tokenizer, two speakers' audio and CSVs, two tiny SA models, and the reference logits.

    The tokenizer is the real SA one when ../shared/uaspeech is there (then the metadata keys are
    compared with a real metadata file's), else a small SentencePiece model with the SA ids."""
    from hyperpyyaml import resolve_references

    from local.store import load_tokenizer

    root = tmp_path_factory.mktemp("extract")
    shared = _shared_or_none(request)
    if shared is not None:
        tokenizer = shared / "sa_tokenizer.model"
        real_keys = list(json.loads((shared / "metadata" / "F02_metadata.json").read_text()))
    else:
        from local.synthetic import train_tokenizer

        tokenizer = root / "tokenizer.model"
        train_tokenizer(tokenizer, [w for _, w, _ in WORDS], SYNTHETIC_VOCAB, seed=3)
        real_keys = list(METADATA_KEYS)  # checked against the real files by the last test
    sp = load_tokenizer(tokenizer)
    vocab = sp.vocab_size()
    data = root / "data"
    speakers = {s: _write_audio(data, s, seed=i) for i, s in enumerate(SPEAKERS)}
    # F02: a save folder with two checkpoints; the best by WRA (the older one) must be used.
    f02 = _build_model(root / "exp" / "F02" / "save", vocab, seed=11, was=[0.8, 0.2])
    # M05: one checkpoint, given as its CKPT+ folder, with the hyperparams.yaml that SpeechBrain
    # writes into an experiment folder (references resolved into YAML anchors and aliases).
    m05 = _build_model(root / "exp" / "M05" / "save", vocab, seed=12, was=[0.5])
    with open(TINY, encoding="utf-8") as handle:
        resolved = resolve_references(
            handle, {"output_neurons": vocab, "seed": 12, "save_folder": str(root / "exp" / "M05" / "save")}
        )
    (root / "exp" / "M05" / "hyperparams.yaml").write_text(resolved.getvalue())
    checkpoints = {"F02": f02[0], "M05": m05[0]}
    args = [
        "--tokenizer_file",
        str(tokenizer),
        "--data_root",
        str(data),
        "--device",
        "cpu",
        "--overrides",
        f"{{output_neurons: {vocab}}}",
        "--models",
        f"F02={TINY}:{root / 'exp' / 'F02' / 'save'}",
        f"M05={root / 'exp' / 'M05' / 'hyperparams.yaml'}:{m05[0]}",
        "--speakers",
        *(f"{s}={speakers[s][0]}" for s in SPEAKERS),
    ]
    # The same jobs as a job file (paths relative to its folder).
    (root / "jobs.yaml").write_text(
        f"logit_root: logit_extraction\ntokenizer_file: {tokenizer}\ndata_root: data\n"
        f"overrides: {{output_neurons: {vocab}}}\n"
        f"models:\n  F02: {{hparams: {TINY}, checkpoint: exp/F02/save}}\n"
        f"  M05: {{hparams: exp/M05/hyperparams.yaml, checkpoint: exp/M05/save/{m05[0].name}}}\n"
        f"speakers: {{F02: data/F02.csv, M05: data/M05.csv}}\npairs: all\n"
    )
    refs = {}
    for model in MODELS:
        hp = _load_checkpoint(checkpoints[model], vocab)
        for spk in SPEAKERS:
            for utt_id, wav, word in speakers[spk][1]:
                refs[(model, utt_id)] = _reference(hp, wav, word, sp)
    return dict(
        root=root,
        tokenizer=tokenizer,
        sp=sp,
        vocab=vocab,
        speakers=speakers,
        args=args,
        checkpoints=checkpoints,
        refs=refs,
        real_keys=real_keys,
    )


def _mtimes(logit_root):
    return {p: p.stat().st_mtime_ns for p in Path(logit_root).rglob("*.pt")} | {
        p: p.stat().st_mtime_ns for p in Path(logit_root).rglob("*_metadata.json")
    }


def test_extract_end_to_end(world):
    from local.store import LogitStore, TokenTable, load_tokenizer

    import extract_logits

    logit_root = world["root"] / "logit_extraction"
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--logit_root", str(logit_root), *world["args"]],
        capture_output=True,
        text=True,
        cwd=RECIPE,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    pairs = [(m, s) for m in MODELS for s in SPEAKERS]

    # The recipe's store reads the tree (it checks ids, words, U_i against the tokenizer, V, finiteness).
    store = LogitStore(logit_root, TokenTable(load_tokenizer(world["tokenizer"])), pairs)
    assert len(store) == sum(len(world["speakers"][s][1]) for _, s in pairs)

    sp, vocab = world["sp"], world["vocab"]
    for model, spk in pairs:
        folder = logit_root / model / spk
        meta = json.loads((folder / f"{spk}_metadata.json").read_text())
        assert list(meta) == world["real_keys"]
        expected = world["speakers"][spk][1]
        assert meta["model_name"] == model
        assert meta["num_utterances"] == len(expected)
        assert meta["utterance_ids"] == [u for u, _, _ in expected]  # ascending duration
        assert meta["target_words"] == [w for _, _, w in expected]
        assert meta["token_lens"] == [[1.0]] * len(expected)
        assert meta["vocab_size"] == meta["vocab_size_decoder"] == meta["vocab_size_ctc"] == vocab
        decoder = torch.load(folder / f"{spk}_decoder_logits.pt", weights_only=True)
        ctc = torch.load(folder / f"{spk}_ctc_logits.pt", weights_only=True)
        assert isinstance(decoder, list) and isinstance(ctc, list)
        assert len(decoder) == len(ctc) == len(expected)
        for (utt_id, _, word), dec, c, frames in zip(expected, decoder, ctc, meta["ctc_frame_lens"]):
            ref_dec, ref_ctc = world["refs"][(model, utt_id)]
            assert dec.dtype == c.dtype == torch.float32
            assert dec.shape == (len(sp.encode_as_ids(word)) + 1, vocab)
            assert c.shape == (frames, vocab) and isinstance(frames, int)
            torch.testing.assert_close(dec, ref_dec, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(c, ref_ctc, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(store.logits(store.stream(model, utt_id)), dec)

    summary = json.loads((logit_root / "extraction_summary.json").read_text())["extractions"]
    assert sorted(summary) == sorted(f"{m}/{s}" for m, s in pairs)
    assert all(r["status"] == "extracted" for r in summary.values())
    assert Path(summary["F02/M05"]["checkpoint"]) == world["checkpoints"]["F02"]  # best WRA, not latest
    assert summary["F02/M05"]["checkpoint_selected_by"] == "max:WRA"

    # A second run (the same jobs from a job file) skips the finished pairs: nothing is rewritten.
    before = _mtimes(logit_root)
    assert extract_logits.main(["--jobs", str(world["root"] / "jobs.yaml"), "--device", "cpu"]) == 0
    assert _mtimes(logit_root) == before

    # A pair left as a crash before the last file leaves it (no metadata, the in-progress marker)
    # is redone, and only it.
    (logit_root / "M05" / "F02" / "F02_metadata.json").unlink()
    (logit_root / "M05" / "F02" / extract_logits.IN_PROGRESS).write_text("pid 1\n")
    assert extract_logits.main(["--logit_root", str(logit_root), *world["args"]]) == 0
    after = _mtimes(logit_root)
    redone = {p for p in after if before.get(p) != after[p]}
    assert redone == {
        logit_root / "M05" / "F02" / f"F02_{n}" for n in ("decoder_logits.pt", "ctc_logits.pt", "metadata.json")
    }
    assert not list(logit_root.rglob(".*tmp*")) and not list(logit_root.rglob(extract_logits.IN_PROGRESS))


def test_batched_extraction_without_ctc_files(world):
    """--batch_size 3: each utterance's logits are its batch-of-one logits up to float rounding (the
    utterances of a batch differ in length: padded frames and tokens must change nothing), in the
    CSV's order; --ctc none writes no CTC file, and the pair counts as finished for --ctc none."""
    import extract_logits

    logit_root = world["root"] / "logit_extraction_batched"
    args = ["--logit_root", str(logit_root), *world["args"], "--batch_size", "3", "--ctc", "none"]
    assert extract_logits.main(args) == 0
    for model in MODELS:
        for spk in SPEAKERS:
            folder = logit_root / model / spk
            assert not (folder / f"{spk}_ctc_logits.pt").exists()
            meta = json.loads((folder / f"{spk}_metadata.json").read_text())
            expected = world["speakers"][spk][1]
            assert meta["utterance_ids"] == [u for u, _, _ in expected]
            decoder = torch.load(folder / f"{spk}_decoder_logits.pt", weights_only=True)
            for (utt_id, _, _), dec, frames in zip(expected, decoder, meta["ctc_frame_lens"]):
                ref_dec, ref_ctc = world["refs"][(model, utt_id)]
                torch.testing.assert_close(dec, ref_dec, rtol=1e-4, atol=1e-4)
                assert frames == ref_ctc.shape[0]
    before = _mtimes(logit_root)
    assert extract_logits.main(args) == 0  # finished without CTC files: skipped
    assert _mtimes(logit_root) == before
    # a run that wants the CTC files does not take these pairs for finished
    assert extract_logits.main(["--logit_root", str(logit_root), *world["args"]]) == 1
    assert extract_logits.main(["--logit_root", str(logit_root), *world["args"], "--batch_size", "0"]) == 2


def test_bf16_close_to_fp32(world):
    import extract_logits

    logit_root = world["root"] / "logit_extraction_bf16"
    args = [*world["args"], "--pairs", "M05:F02", "--precision", "bf16"]
    assert extract_logits.main(["--logit_root", str(logit_root), *args]) == 0
    assert [p.relative_to(logit_root).as_posix() for p in logit_root.glob("*/*")] == ["M05/F02"]
    decoder = torch.load(logit_root / "M05" / "F02" / "F02_decoder_logits.pt", weights_only=True)
    for (utt_id, _, _), dec in zip(world["speakers"]["F02"][1], decoder):
        ref = world["refs"][("M05", utt_id)][0]
        assert dec.dtype == torch.float32
        assert (dec - ref).abs().max() < 0.05 * ref.abs().max() + 0.05
        assert not torch.equal(dec, ref)  # bf16 really ran


def _one_error_line(err, *words):
    """The stderr of a refused run: one ``ERROR:`` line naming ``words``, no traceback."""
    lines = [line for line in err.splitlines() if line.startswith("ERROR:")]
    assert len(lines) == 1, err
    assert all(w in lines[0] for w in words), (lines[0], words)
    assert "Traceback" not in err


def test_bad_input_is_named(world, tmp_path, capsys):
    """A missing or corrupt audio file, an empty CSV, a --device this machine lacks: one line
    naming it, exit status 2, before anything is written (no logit folder, no summary)."""
    import extract_logits

    csv, utts = world["speakers"]["F02"]
    logit_root = tmp_path / "logits"

    def run(csv_file, *extra):
        args = [f"F02={csv_file}" if a == f"F02={csv}" else a for a in world["args"]]
        code = extract_logits.main(["--logit_root", str(logit_root), *args, "--pairs", "M05:F02", *extra])
        return code, capsys.readouterr().err

    missing = tmp_path / "missing.csv"
    missing.write_text(csv.read_text().replace(utts[0][0] + ".wav", "missing.wav", 1))
    code, err = run(missing)
    assert code == 2
    _one_error_line(err, "missing.wav", utts[0][0], "does not exist")
    assert not logit_root.exists()

    # a .wav that is not audio (its bytes overwritten), in a copy of the data
    data = tmp_path / "data"
    shutil.copytree(world["root"] / "data", data)
    corrupt = data / "audio" / "F02" / f"{utts[-1][0]}.wav"
    corrupt.write_bytes(b"RIFF\x00\x00garbage" * 10)
    args = [str(data) if a == str(world["root"] / "data") else a for a in world["args"]]
    code = extract_logits.main(["--logit_root", str(logit_root), *args, "--pairs", "M05:F02"])
    err = capsys.readouterr().err
    assert code == 2
    _one_error_line(err, str(corrupt), utts[-1][0], "unreadable audio file")
    assert not logit_root.exists()

    for text, what in (("", "is empty"), ("ID,duration,wav,spk_id,wrd\n", "has a header but no utterances")):
        empty = tmp_path / "empty.csv"
        empty.write_text(text)
        code, err = run(empty)
        assert code == 2
        _one_error_line(err, str(empty), what)
        assert not logit_root.exists()

    devices = ["cuda:99"] + ([] if torch.cuda.is_available() else ["cuda"])
    for device in devices:
        code, err = run(csv, "--device", device)
        assert code == 2
        _one_error_line(err, f"--device={device} is not allowed")
        assert not logit_root.exists()

    with pytest.raises(SystemExit) as exit_:  # a mistyped option: one line too
        extract_logits.main(["--logit_root", str(logit_root), "--precison", "bf16"])
    assert exit_.value.code == 2
    _one_error_line(capsys.readouterr().err, "--precison")


def test_metadata_keys_are_the_real_ones(shared_uaspeech):
    for path in sorted((shared_uaspeech / "metadata").glob("*_metadata.json")):
        assert list(json.loads(path.read_text())) == list(METADATA_KEYS), path.name
