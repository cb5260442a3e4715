"""extract_logits.py on SA experiment folders as the SA project's fork of SpeechBrain left them.

The fixture (tests/fixtures/sa_experiment.yaml) has the keys and objects of the SA project's
ua_SA_val_uncommon_WRA.yaml with small sizes; each experiment folder is laid out as its train.py
left it: ``<out>/<sa_model>/<speaker>/<seed>/hyperparams.yaml`` and ``save/`` with ``CKPT+``
folders (keys spelt ``mutihead_attn``, as SpeechBrain 1.0 saved them), the Pretrainer's
``lm.ckpt`` / ``tokenizer.ckpt`` symlinks, and a symlink to the control model's ``CKPT+`` folder.
The weights are random; the logits must be those of a direct forward pass of the chosen checkpoint.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_extract_logits import _reference, _write_audio

from conftest import RECIPE

FIXTURE = Path(__file__).parent / "fixtures" / "sa_experiment.yaml"
SCRIPT = RECIPE / "extract_logits.py"
FORK_ONLY = ("freeze_encoder_layers", "freeze_decoder_layers")
# One word, three microphones: every utterance has the same number of decoder positions, so the
# SA project's script would have stacked the decoder logits into one [N, U, V] tensor.
ONE_WORD = [("D3", "THREE", ("M5", "M6", "M7"))]

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask:UserWarning"),
]


def _fixture_text(out, vocab):
    return FIXTURE.read_text(encoding="utf-8").replace("__OUT__", str(out)).replace("__VOCAB__", str(vocab))


def _build(text):
    """The fixture's model objects, built by SpeechBrain 1.1.2 as a test can: without the fork-only
    arguments (which it refuses) and without the loggers and Pretrainer (wandb, a hub)."""
    from hyperpyyaml import load_hyperpyyaml

    lines = [line for line in text.split("\ntrain_logger:")[0].splitlines() if not line.strip().startswith(FORK_ONLY)]
    return load_hyperpyyaml("\n".join(lines))


def _save(hp, meta):
    """One checkpoint with the fork's key spelling; returns its folder. Perturbs the weights after."""
    ckpt = Path(hp["checkpointer"].save_checkpoint(meta=meta).path)
    state = torch.load(ckpt / "model.ckpt", weights_only=True)
    renamed = {k.replace(".multihead_attn", ".mutihead_attn"): v for k, v in state.items()}
    assert any(".mutihead_attn" in k for k in renamed), "the fixture must have decoder cross-attention keys"
    torch.save(renamed, ckpt / "model.ckpt")
    with torch.no_grad():
        for p in hp["model"].parameters():
            p.add_(0.1 * torch.randn_like(p))
    time.sleep(0.01)  # distinct unixtime in CKPT.yaml
    return ckpt


def make_experiment(root, name, vocab, tokenizer_file, wras, control_wra, seed, eos_bias=0.0, blank_bias=0.0):
    """An SA experiment folder of model ``name``; returns (exp folder, {label: CKPT folder}).
    ``eos_bias`` is added to the decoder's </s> output bias (a model that ends its hypotheses),
    ``blank_bias`` to the CTC layer's blank output bias (CTC posteriors that let a short
    hypothesis explain the audio, so that the beam search ends hypotheses too)."""
    torch.manual_seed(seed)
    out = root / "results"
    text = (
        _fixture_text(out, vocab)
        .replace("sa_model: M08", f"sa_model: {name}")
        .replace("speaker: M08", f"speaker: {name}")
    )
    exp = out / name / name / "7775"
    hp = _build(text)
    hp["normalize"].train()
    hp["normalize"](2.0 * torch.randn(3, 40, 80) + 1.0, torch.ones(3))
    hp["normalize"].eval()
    with torch.no_grad():
        hp["seq_lin"].w.bias[2] += eos_bias
        hp["ctc_lin"].w.bias[0] += blank_bias
    ckpts = {f"own{i}": _save(hp, {"ACC": 0.5, "WER": 100.0 * (1 - w), "WRA": w}) for i, w in enumerate(wras)}
    (exp / "hyperparams.yaml").write_text(text, encoding="utf-8")
    # The control model this SA model started from, elsewhere, and the symlink to it in save/.
    control_hp = _build(text.replace(f"{out}/", f"{root / 'control'}/"))
    control_hp["normalize"].train()
    control_hp["normalize"](torch.randn(3, 40, 80), torch.ones(3))
    control_hp["normalize"].eval()
    control = _save(control_hp, {"ACC": 0.5, "WER": 100.0 * (1 - control_wra), "WRA": control_wra})
    link = exp / "save" / "CKPT+2024-07-11+20-38-16+00"
    link.symlink_to(control, target_is_directory=True)
    ckpts["control"] = link
    # The Pretrainer's symlinks: lm.ckpt and tokenizer.ckpt collected into save/.
    pretrained = root / "pretrained"
    pretrained.mkdir(exist_ok=True)
    torch.save(hp["lm_model"].state_dict(), pretrained / "lm.ckpt")
    (pretrained / "tokenizer.ckpt").write_bytes(Path(tokenizer_file).read_bytes())
    for file in ("lm.ckpt", "tokenizer.ckpt"):
        (exp / "save" / file).symlink_to(pretrained / file)
    return exp, ckpts


@pytest.fixture(scope="module")
def experiments(tmp_path_factory):
    from local.store import load_tokenizer
    from local.synthetic import train_tokenizer

    root = tmp_path_factory.mktemp("sa_exp")
    tokenizer = root / "tokenizer.model"
    train_tokenizer(tokenizer, ["THREE", "ALPHA", "COMMAND", "YOU"], 120, seed=3)
    sp = load_tokenizer(tokenizer)
    data = root / "data"
    csv, utts = _write_audio(data, "M08", seed=5)
    one_word = root / "one_word"
    import test_extract_logits as tel

    words, tel.WORDS = tel.WORDS, ONE_WORD
    try:
        csv1, utts1 = _write_audio(one_word, "M08", seed=6)
    finally:
        tel.WORDS = words
    # M08: the control model's checkpoint has the highest WRA: it is the one the SA pipeline loaded.
    m08, m08_ckpts = make_experiment(root, "M08", sp.vocab_size(), tokenizer, [0.6, 0.75], 0.9, seed=1)
    # F02: two of its own checkpoints tie on the highest WRA: the most recent wins; the control is worse.
    f02, f02_ckpts = make_experiment(root, "F02", sp.vocab_size(), tokenizer, [0.7, 0.7], 0.3, seed=2)
    return dict(
        root=root,
        tokenizer=tokenizer,
        sp=sp,
        data=data,
        csv=csv,
        utts=utts,
        one_word=(one_word, csv1, utts1),
        exps={"M08": (m08, m08_ckpts["control"]), "F02": (f02, f02_ckpts["own1"])},
    )


def run_extract(experiments, logit_root, *extra, models=("M08", "F02"), csv=None, data=None):
    e = experiments
    args = [
        sys.executable,
        str(SCRIPT),
        "--logit_root",
        str(logit_root),
        "--tokenizer_file",
        str(e["tokenizer"]),
        "--data_root",
        str(data or e["data"]),
        "--device",
        "cpu",
        "--models",
        *(f"{m}={e['exps'][m][0] / 'hyperparams.yaml'}:{e['exps'][m][0] / 'save'}" for m in models),
        "--speakers",
        f"M08={csv or e['csv']}",
        *extra,
    ]
    return subprocess.run(args, capture_output=True, text=True, timeout=600)


def test_experiment_folders_load_as_they_are(experiments, tmp_path):
    """Fork-only arguments dropped with one line each (the file untouched), mutihead_attn keys,
    symlinks in save/, the checkpoint the SA pipeline chose (highest WRA, ties to the most recent),
    and the logits of a direct forward pass of that checkpoint."""
    e = experiments
    before = {m: (exp / "hyperparams.yaml").read_bytes() for m, (exp, _) in e["exps"].items()}
    proc = run_extract(e, tmp_path / "logits")
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stderr
    for model, (exp, _) in e["exps"].items():
        assert (exp / "hyperparams.yaml").read_bytes() == before[model]  # never edited
        for arg in FORK_ONLY:
            lines = [line for line in log.splitlines() if f"dropped the argument {arg} of Transformer" in line]
            assert any(str(exp / "hyperparams.yaml") in line for line in lines), (model, arg)
    # the control model's symlink wins on M08, with a warning; F02's tie goes to its latest own checkpoint
    assert "is a symlink to" in log and str(e["exps"]["M08"][1]) in log
    assert log.count("is a symlink to") == 1
    summary = json.loads((tmp_path / "logits" / "extraction_summary.json").read_text())["extractions"]
    for model, (_, chosen) in e["exps"].items():
        assert Path(summary[f"{model}/M08"]["checkpoint"]) == chosen, model
        assert summary[f"{model}/M08"]["checkpoint_selected_by"] == "max:WRA"
        assert summary[f"{model}/M08"]["tf32"] is False
        hp = _build(_fixture_text(e["root"] / "results", e["sp"].vocab_size()))
        # SpeechBrain's Checkpointer loads the chosen folder (renaming mutihead_attn as it goes)
        checkpointer = type(hp["checkpointer"])(chosen.parent, recoverables=hp["checkpointer"].recoverables)
        checkpointer.load_checkpoint(checkpointer.find_checkpoint(ckpt_predicate=lambda c, p=chosen: c.path == p))
        for key in ("CNN", "Transformer", "seq_lin", "ctc_lin", "normalize"):
            hp[key].eval()
        decoder = torch.load(tmp_path / "logits" / model / "M08" / "M08_decoder_logits.pt", weights_only=True)
        ctc = torch.load(tmp_path / "logits" / model / "M08" / "M08_ctc_logits.pt", weights_only=True)
        for i, (_, wav, word) in enumerate(e["utts"]):
            ref_dec, ref_ctc = _reference(hp, wav, word, e["sp"])
            torch.testing.assert_close(decoder[i], ref_dec, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(ctc[i], ref_ctc, atol=1e-5, rtol=1e-5)


def _as_sa_script_wrote_it(pair_folder):
    """Rewrites a pair as the SA project's current extract_sa_logits.py writes one: no legacy
    vocab_size key, its key order, the decoder logits stacked into one [N, U, V] tensor."""
    meta_file = pair_folder / "M08_metadata.json"
    meta = json.loads(meta_file.read_text())
    order = ("model_name", "num_utterances", "vocab_size_decoder", "vocab_size_ctc", "utterance_ids")
    sa = {k: meta[k] for k in order} | {k: meta[k] for k in ("token_lens", "ctc_frame_lens", "target_words")}
    meta_file.write_text(json.dumps(sa, indent=2))
    dec_file = pair_folder / "M08_decoder_logits.pt"
    decoder = torch.load(dec_file, weights_only=True)
    torch.save(torch.stack(decoder), dec_file)
    return sa


def test_finished_output_is_never_redone_or_overwritten(experiments, tmp_path):
    """The SA script's finished pairs are finished; a pair that differs is refused (exit 1, files
    untouched) until --force; the SA script's summary keys are kept; an unreadable summary stops
    the run before anything is written."""
    e = experiments
    one_word, csv1, _ = e["one_word"]
    root = tmp_path / "logits"
    proc = run_extract(e, root, models=("F02",), csv=csv1, data=one_word)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pair = root / "F02" / "M08"
    _as_sa_script_wrote_it(pair)
    (root / "extraction_summary.json").write_text(
        json.dumps({"successful_extractions": ["F02"], "failed_extractions": [], "total_models": 15})
    )
    stamps = {p: p.stat().st_mtime_ns for p in pair.iterdir()}
    proc = run_extract(e, root, models=("F02",), csv=csv1, data=one_word)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "F02 on M08: finished, skipped" in proc.stderr
    assert {p: p.stat().st_mtime_ns for p in pair.iterdir()} == stamps
    summary = json.loads((root / "extraction_summary.json").read_text())
    assert summary["successful_extractions"] == ["F02"] and summary["total_models"] == 15  # merged
    assert summary["extractions"]["F02/M08"]["status"] == "found finished"

    # another extraction in the folder (another word list): refused, untouched, exit 1
    meta = json.loads((pair / "M08_metadata.json").read_text())
    meta["target_words"] = ["FOUR"] * len(meta["target_words"])
    (pair / "M08_metadata.json").write_text(json.dumps(meta))
    stamps = {p: p.stat().st_mtime_ns for p in pair.iterdir()}
    proc = run_extract(e, root, models=("F02",), csv=csv1, data=one_word)
    assert proc.returncode == 1
    assert "holds an extraction that differs" in proc.stderr and "--force" in proc.stderr
    assert {p: p.stat().st_mtime_ns for p in pair.iterdir()} == stamps
    proc = run_extract(e, root, "--force", models=("F02",), csv=csv1, data=one_word)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((pair / "M08_metadata.json").read_text())["target_words"] == ["THREE"] * 3

    # logit files without metadata and without this script's in-progress marker: someone else's
    # files, refused until --force
    (pair / "M08_metadata.json").unlink()
    stamps = {p: p.stat().st_mtime_ns for p in pair.iterdir()}
    proc = run_extract(e, root, models=("F02",), csv=csv1, data=one_word)
    assert proc.returncode == 1 and "without metadata, not left by an interrupted run" in proc.stderr
    assert {p: p.stat().st_mtime_ns for p in pair.iterdir()} == stamps

    # an unreadable summary: the run stops before extracting anything, the file keeps its bytes
    (root / "extraction_summary.json").write_text("{not json")
    proc = run_extract(e, root, "--force", models=("F02",), csv=csv1, data=one_word)
    assert proc.returncode == 2 and "extraction_summary.json is unreadable" in proc.stderr
    assert (root / "extraction_summary.json").read_text() == "{not json"
    assert "Traceback" not in proc.stderr


def test_tf32_is_off_after_speechbrain_turned_it_on():
    """SpeechBrain 1.1.2 turns TF32 on when it is imported; extraction turns it off (the fork did
    not use it) unless --allow_tf32."""
    import extract_logits

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        assert extract_logits.set_tf32(False) is False
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert extract_logits.set_tf32(True) is True and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
