"""The rehearsal corpus's model stage (train_rehearsal_models.py, local/rehearsal_models.py) on a
tiny corpus in the rehearsal layout (tests/helpers/mini_corpus.py: three speakers, the four
committed espeak-ng words, B1/B2/B3, two microphones): the SA experiment folders it writes, their
loading by the recipe's own code (SAModel, extract_logits.py, load_language_model), resuming after
a kill, and one-line errors for bad options and input.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers.mini_corpus import make_corpus

from conftest import RECIPE

SCRIPT = RECIPE / "train_rehearsal_models.py"
FIXTURE = Path(__file__).parent / "fixtures" / "sa_experiment.yaml"
SPEAKERS = ("F02", "M05", "M08")
MODELS = ("SI", *SPEAKERS)
# Keys of the SA project's hparams (the fixture) that the rehearsal models have no use for: the
# fork's freeze arguments, its wandb logger, data preparation, the validation beam (validation
# decodes greedily here).
NOT_IN_REHEARSAL = {"freeze_encoder_layers", "freeze_decoder_layers", "wandb_logger", "skip_prep", "valid_beam_size"}

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask:UserWarning"),
]


def _tokenizer(path, corpus):
    from local.synthetic import train_tokenizer

    blocks = json.loads((corpus / "corpus.json").read_text())["blocks"]
    words = sorted({w for block in blocks.values() for w in block.values()})
    train_tokenizer(path, words, 120, seed=3)
    return path


def _train(corpus, models, tokenizer, **kwargs):
    from local.rehearsal_models import train_models

    lines = []
    kwargs = {"preset": "tiny", "threads": 1, "progressbar": False, "log": lines.append, **kwargs}
    manifest = train_models(corpus, models, tokenizer, **kwargs)
    return manifest, lines


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("rehearsal")
    corpus = make_corpus(root / "corpus", SPEAKERS)
    tokenizer = _tokenizer(root / "tokenizer.model", corpus)
    start = time.time()
    manifest, lines = _train(corpus, root / "models", tokenizer)
    return dict(
        root=root,
        corpus=corpus,
        tokenizer=tokenizer,
        models=root / "models",
        manifest=manifest,
        lines=lines,
        seconds=time.time() - start,
    )


def _yaml(path):
    import ruamel.yaml

    with open(path, encoding="utf-8") as handle:
        return ruamel.yaml.YAML().load(handle)


def _tensors(path):
    return torch.load(path, weights_only=True, map_location="cpu")


def test_tiny_stage_writes_sa_experiment_folders(tiny):
    """LM, SI and one SA model per speaker, each an SA experiment folder: the SA project's keys,
    its search and scorers, one checkpoint with WRA/WER in CKPT.yaml, the Pretrainer's symlinks;
    SI trained on every B1 + B2, each SA model on its own B1 with B2 for selection, B3 for test."""
    models = tiny["models"]
    assert tiny["seconds"] < 60, f"the tiny stage took {tiny['seconds']:.1f} s"
    assert sorted(p.name for p in models.iterdir()) == sorted(["LM", *MODELS, "rehearsal_models.json"])
    fixture_keys = set(_yaml(FIXTURE))
    for name in MODELS:
        folder = models / name
        hp = _yaml(folder / "hyperparams.yaml")
        missing = fixture_keys - set(hp) - NOT_IN_REHEARSAL
        assert not missing, (name, missing)
        scorers = [s.tag.value for s in hp["scorer_test_search"]["full_scorers"]]  # in the SA yaml's order
        assert scorers == [f"!new:speechbrain.decoders.scorer.{c}" for c in ("TransformerLMScorer", "CTCScorer")]
        assert hp["test_search"].tag.value == "!new:speechbrain.decoders.S2STransformerBeamSearcher"
        for key in ("test_beam_size", "ctc_weight_decode", "lm_weight"):
            assert hp[key] == _yaml(FIXTURE)[key], key
        assert set(hp["checkpointer"]["recoverables"]) == {"model", "noam_scheduler", "normalizer", "counter"}
        assert hp["pretrainer"]["collect_in"] == hp["save_folder"] == str((folder / "save").resolve())
        ckpts = sorted((folder / "save").glob("CKPT+*"))
        assert len(ckpts) == 1, ckpts
        for file in ("model.ckpt", "normalizer.ckpt", "noam_scheduler.ckpt", "counter.ckpt", "CKPT.yaml"):
            assert (ckpts[0] / file).is_file(), (name, file)
        for file in ("lm.ckpt", "tokenizer.ckpt"):
            link = folder / "save" / file
            assert link.is_symlink() and not os.path.isabs(os.readlink(link)), (name, file)
            assert link.resolve() == (models / "LM" / file).resolve()
        record = json.loads((folder / "rehearsal_model.json").read_text())
        assert Path(record["checkpoint"]) == ckpts[0].resolve()
        meta = _yaml(ckpts[0] / "CKPT.yaml")
        if name == "SI":
            csvs = [str(tiny["corpus"] / "csv" / f"{s}_{b}.csv") for s in SPEAKERS for b in ("B1", "B2")]
            assert hp["train_csv"] == csvs
            assert hp["valid_csv"] == [] and hp["load_ckpt"] is None
            assert record["checkpoint_selected_by"] == "latest"
        else:
            assert [Path(p).name for p in (*hp["train_csv"], *hp["valid_csv"], *hp["test_csv"])] == [
                f"{name}_B1.csv",
                f"{name}_B2.csv",
                f"{name}_B3.csv",
            ]
            si_record = json.loads((models / "SI" / "rehearsal_model.json").read_text())
            assert Path(hp["load_ckpt"]) == Path(si_record["checkpoint"])
            assert {"ACC", "WER", "WRA", "epoch"} <= set(meta) and 0.0 <= meta["WRA"] <= 1.0
            assert record["checkpoint_selected_by"] == "max:WRA"
            assert record["checkpoint_meta"]["WRA"] == meta["WRA"]
            assert record["test_greedy_wra_by_speaker"].keys() == {name}
            stats = (folder / f"wer_{name}_B3_greedy.txt").read_text()
            assert stats.startswith("%WER") and f"{name}_B3_" in stats
    manifest = json.loads((models / "rehearsal_models.json").read_text())
    assert set(manifest["models"]) == {"LM", *MODELS}
    assert any(line.startswith("SI: SI on") for line in tiny["lines"])


def test_models_load_through_samodel_and_extract_logits(tiny, tmp_path):
    """SAModel loads each folder by the path of the user's models (the checkpoint chosen by max
    WRA), and extract_logits.py writes a finished, consistent pair whose logits are those of the
    trained weights (a direct forward pass of the checkpoint loaded by SpeechBrain's Checkpointer)."""
    from hyperpyyaml import load_hyperpyyaml
    from test_extract_logits import _reference

    from local.sa_models import SAModel, read_speaker_csv
    from local.store import load_tokenizer

    import extract_logits

    models, corpus = tiny["models"], tiny["corpus"]
    sp = load_tokenizer(tiny["tokenizer"])
    for name in ("SI", "F02"):
        model = SAModel(name, models / name / "hyperparams.yaml", models / name / "save")
        record = json.loads((models / name / "rehearsal_model.json").read_text())
        assert model.ckpt_dir.resolve() == Path(record["checkpoint"])
        assert model.vocab_size == sp.vocab_size()
    proc = subprocess.run(
        [
            sys.executable,
            str(RECIPE / "extract_logits.py"),
            "--logit_root",
            str(tmp_path / "logits"),
            "--tokenizer_file",
            str(models / "F02" / "save" / "tokenizer.ckpt"),
            "--data_root",
            str(corpus),
            "--device",
            "cpu",
            "--models",
            *(f"{m}={models / m / 'hyperparams.yaml'}:{models / m / 'save'}" for m in ("F02", "SI")),
            "--speakers",
            *(f"{s}={corpus / 'csv' / f'{s}.csv'}" for s in ("F02", "M08")),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    utts = read_speaker_csv(corpus / "csv" / "M08.csv", "M08", corpus)
    assert extract_logits.pair_status(tmp_path / "logits", "F02", "M08", utts, sp) == ("finished", None)
    summary = json.loads((tmp_path / "logits" / "extraction_summary.json").read_text())["extractions"]
    assert summary["F02/M08"]["checkpoint_selected_by"] == "max:WRA"
    with open(models / "F02" / "hyperparams.yaml", encoding="utf-8") as handle:
        hp = load_hyperpyyaml(handle)
    hp["checkpointer"].recover_if_possible()
    for key in ("CNN", "Transformer", "seq_lin", "ctc_lin", "normalize"):
        hp[key].eval()
    decoder = torch.load(tmp_path / "logits" / "F02" / "M08" / "M08_decoder_logits.pt", weights_only=True)
    ref_dec, _ = _reference(hp, utts[0].wav, utts[0].word, sp)
    torch.testing.assert_close(decoder[0], ref_dec, atol=1e-5, rtol=1e-5)
    # not a model at its initialisation: the trained SA weights differ from the SI weights
    si = _tensors(next((models / "SI" / "save").glob("CKPT+*")) / "model.ckpt")
    sa = _tensors(next((models / "F02" / "save").glob("CKPT+*")) / "model.ckpt")
    assert any(not torch.equal(si[k], sa[k]) for k in si)


def test_lm_loads_via_load_language_model(tiny):
    """decode.py's LM loader builds the experiment's lm_model and loads save/lm.ckpt strictly:
    the LM stage's trained weights."""
    from local.sa_models import load_language_model

    models = tiny["models"]
    lm = load_language_model(models / "M05" / "hyperparams.yaml", models / "M05" / "save" / "lm.ckpt")
    trained = _tensors(next((models / "LM" / "save").glob("CKPT+*")) / "model.ckpt")
    state = lm.state_dict()
    assert state.keys() == trained.keys()
    for key, value in trained.items():
        assert torch.equal(state[key], value), key
    with torch.no_grad():
        logits = lm(torch.tensor([[1, 5, 6]]))
    config = json.loads((models / "rehearsal_models.json").read_text())["config"]
    assert logits.shape == (1, 3, config["overrides"]["lm"]["output_neurons"])


def _run_cli(corpus, models, tokenizer, *extra):
    args = [sys.executable, str(SCRIPT), "--corpus", str(corpus), "--models_dir", str(models)]
    args += ["--tokenizer_file", str(tokenizer), "--preset", "tiny", "--threads", "1", "--noprogressbar", *extra]
    return args


def test_killed_run_resumes_to_the_same_models(tiny, tmp_path):
    """A run killed while an SA model trains, run again: the finished models (LM, SI) are skipped,
    the SA model resumes from its SpeechBrain checkpoint, and every model ends bit-identical to an
    uninterrupted run's (deterministic for the seed). A third run redoes nothing."""
    extra = ["--overrides", "{sa: {number_of_epochs: 2}}"]
    _train(tiny["corpus"], tmp_path / "reference", tiny["tokenizer"], overrides={"sa": {"number_of_epochs": 2}})
    models = tmp_path / "models"
    proc = subprocess.Popen(
        _run_cli(tiny["corpus"], models, tiny["tokenizer"], *extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    deadline = time.time() + 900  # a busy machine: wait for the checkpoint, not a fixed time
    while time.time() < deadline and proc.poll() is None:
        if list((models / "F02" / "save").glob("CKPT+*/CKPT.yaml")):
            proc.send_signal(signal.SIGSTOP)
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed"
    assert not (models / "F02" / "rehearsal_model.json").exists(), "F02 finished before the kill"
    proc.kill()
    proc.wait()
    rerun = subprocess.run(
        _run_cli(tiny["corpus"], models, tiny["tokenizer"], *extra),
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "LM: finished, skipped" in rerun.stdout and "SI: finished, skipped" in rerun.stdout
    assert "F02: resuming from CKPT+" in rerun.stdout
    for name in ("LM", *MODELS):
        ref = _tensors(next((tmp_path / "reference" / name / "save").glob("CKPT+*")) / "model.ckpt")
        got = _tensors(next((models / name / "save").glob("CKPT+*")) / "model.ckpt")
        for key in ref:
            assert torch.equal(ref[key], got[key]), (name, key)
    stamps = {p: p.stat().st_mtime_ns for p in models.rglob("*") if p.is_file()}
    again = subprocess.run(
        _run_cli(tiny["corpus"], models, tiny["tokenizer"], *extra), capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("finished, skipped") == 1 + len(MODELS)
    changed = [p for p, t in stamps.items() if p.stat().st_mtime_ns != t and p.name != "rehearsal_models.json"]
    assert not changed, changed


@pytest.mark.parametrize(
    "case",
    [
        "preset",
        "threads",
        "device",
        "corpus",
        "tokenizer",
        "overrides",
        "lower_case",
        "missing_audio",
        "other_configuration",
        "cross",
    ],
)
def test_bad_options_stop_with_one_line(tiny, tmp_path, capsys, case):
    """Bad options and input stop before anything is written, with one ERROR line naming the
    option, the file or the utterance; a folder of another configuration is left as it is."""
    import shutil

    import train_rehearsal_models

    corpus, models, tokenizer = tiny["corpus"], tmp_path / "models", tiny["tokenizer"]
    extra, expect = [], None
    if case == "preset":
        extra, expect = ["--preset", "huge"], "--preset=huge is not allowed"
    elif case == "threads":
        extra, expect = ["--threads", "0"], "--threads=0"
    elif case == "device":
        if torch.cuda.is_available():
            pytest.skip("a CUDA device is available here")
        extra, expect = ["--device", "cuda"], "no CUDA device"
    elif case == "corpus":
        corpus, expect = tmp_path / "nowhere", "no csv/ folder"
    elif case == "tokenizer":
        tokenizer, expect = tmp_path / "none.model", "none.model does not exist"
    elif case == "overrides":
        extra, expect = ["--overrides", "{si: {number_of_epoch: 2}}"], "si.number_of_epoch is not a key"
    elif case in ("lower_case", "missing_audio"):
        corpus = tmp_path / "corpus"
        shutil.copytree(tiny["corpus"], corpus)
        csv = corpus / "csv" / "M05_B2.csv"
        if case == "lower_case":
            csv.write_text(csv.read_text().replace(",THREE", ",three"))
            expect = "M05_B2.csv, utterance M05_B2_D3_M"
        else:
            (corpus / "audio" / "M05" / "M05_B2_LA_M6.wav").unlink()
            expect = "utterance M05_B2_LA_M6"
    elif case == "other_configuration":
        models = tiny["models"]
        extra, expect = ["--seed", "7"], "holds models of another configuration (seed (1986 -> 7))"
    elif case == "cross":  # without --speakers: checked against the corpus before anything is trained
        extra, expect = ["--cross", "M99"], "--cross M99: no such speaker in the corpus"
    before = {p: p.stat().st_mtime_ns for p in models.rglob("*")} if models.exists() else None
    argv = _run_cli(corpus, models, tokenizer, *extra)[2:]
    rc = train_rehearsal_models.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("ERROR: ") and expect in err[0], err
    if before is None:
        assert not models.exists()
    else:
        assert {p: p.stat().st_mtime_ns for p in models.rglob("*")} == before


def test_the_sa_tokenizer_and_its_5000_pieces(shared_uaspeech, tmp_path):
    """With the real SA tokenizer (5000 pieces), read from its path: output layers of 5000, the
    tokenizer collected into save/ byte for byte."""
    from local.sa_models import SAModel

    corpus = make_corpus(tmp_path / "corpus", ("M08",))
    tokenizer = shared_uaspeech / "sa_tokenizer.model"
    _train(corpus, tmp_path / "models", tokenizer)
    model = SAModel("M08", tmp_path / "models" / "M08" / "hyperparams.yaml", tmp_path / "models" / "M08" / "save")
    assert model.vocab_size == model.vocab_size_ctc == 5000
    assert (tmp_path / "models" / "M08" / "save" / "tokenizer.ckpt").read_bytes() == tokenizer.read_bytes()


@pytest.mark.parametrize(
    "override, expect",
    [
        ("{si: {number_of_epochs: -1}}", "si.number_of_epochs=-1 is not allowed: a positive integer"),
        ("{sa: {number_of_epochs: 0}}", "sa.number_of_epochs=0 is not allowed: a positive integer"),
        ("{lm: {lr: .nan}}", "lm.lr=nan is not allowed: a finite number"),
        ("{si: {lr_adam: .inf}}", "si.lr_adam=inf is not allowed: a finite number"),
        ("{si: {number_of_epochs: abc}}", "si.number_of_epochs='abc' is not allowed: an integer"),
        ("{si: {d_model: 0}}", "si.d_model=0 is not allowed: a positive integer"),
        ("{asr: {d_model: 33}}", "si: d_model=33 is not a multiple of nhead=2"),
        ("{si: {label_smoothing: 1.5}}", "si.label_smoothing=1.5 is not allowed: a number in [0, 1)"),
        ("{si: {augment: 1}}", "si.augment=1 is not allowed: true or false"),
        ("{si: {seed: 3}}", "si.seed=3 is not allowed: give --seed"),
        ("{si: {stage: sa}}", "si.stage='sa' is not allowed: not a plain value"),
    ],
)
def test_bad_override_values_stop_with_one_line(tiny, tmp_path, capsys, override, expect):
    """Every --overrides value is checked against the value it replaces (type, finite, sign or the
    knob's range) before anything is written: one ERROR line naming the override, exit status 2."""
    import train_rehearsal_models

    models = tmp_path / "models"
    argv = _run_cli(tiny["corpus"], models, tiny["tokenizer"], "--overrides", override)[2:]
    rc = train_rehearsal_models.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("ERROR: --overrides: ") and expect in err[0], err
    assert not models.exists()


def _copy_models(tiny, tmp_path):
    import shutil

    models = tmp_path / "models"
    shutil.copytree(tiny["models"], models, symlinks=True)
    return models


def test_damaged_finished_model_is_refused_not_skipped(tiny, tmp_path, capsys):
    """A finished model records the size and sha256 of its checkpoint files: a rerun of an intact
    folder skips every model and changes no model file; a truncated model.ckpt of a finished model
    is refused (one ERROR line naming the file and saying to delete the folder), nothing written."""
    import train_rehearsal_models

    models = _copy_models(tiny, tmp_path)
    for name in ("LM", *MODELS):
        files = json.loads((models / name / "rehearsal_model.json").read_text())["files"]
        assert any(rel.startswith("save/CKPT+") and rel.endswith("/model.ckpt") for rel in files), name
    stamps = {p: p.stat().st_mtime_ns for p in models.rglob("*") if p.is_file()}
    _, lines = _train(tiny["corpus"], models, tiny["tokenizer"])
    assert sum("finished, skipped" in line for line in lines) == 1 + len(MODELS), lines
    changed = [p for p, t in stamps.items() if p.stat().st_mtime_ns != t and p.name != "rehearsal_models.json"]
    assert not changed, changed
    ckpt = next((models / "M05" / "save").glob("CKPT+*")) / "model.ckpt"
    os.truncate(ckpt, ckpt.stat().st_size // 2)
    stamps = {p: p.stat().st_mtime_ns for p in models.rglob("*")}
    rc = train_rehearsal_models.main(_run_cli(tiny["corpus"], models, tiny["tokenizer"])[2:])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith(f"ERROR: M05: {ckpt} is ") and "delete" in err[0], err
    assert {p: p.stat().st_mtime_ns for p in models.rglob("*")} == stamps


def test_resumed_model_times_are_marked_as_the_last_run_only(tiny, tmp_path):
    """A finished model whose rehearsal_model.json is lost resumes from its checkpoint (it only
    decodes B3 again): the summary table marks its times as those of the last run only."""
    models = _copy_models(tiny, tmp_path)
    (models / "SI" / "rehearsal_model.json").write_text("{not json")
    _, lines = _train(tiny["corpus"], models, tiny["tokenizer"])
    assert "SI: resuming from CKPT+" in "\n".join(lines)
    rows = {line.split()[0]: line for line in lines if line.split() and line.split()[0] in ("LM", *MODELS)}
    assert rows["SI"].endswith(" *") and not rows["M05"].endswith(" *"), lines
    assert any(line.startswith("* resumed from a checkpoint") for line in lines), lines
    assert json.loads((models / "SI" / "rehearsal_model.json").read_text())["resumed"] is True


def test_keep_only_keeps_the_chosen_checkpoint_of_a_relative_folder(tmp_path, monkeypatch):
    """The models stage keeps only each model's chosen checkpoint. The chosen path is absolute (the
    trained model's), the save folder relative when --corpus is (the README's command): compared
    unresolved, every checkpoint was deleted, the chosen one too (13 of 15 SA models lost theirs)."""
    from speechbrain.utils.checkpoints import Checkpointer

    from local.rehearsal_audio import RehearsalError
    from local.rehearsal_models import _keep_only

    monkeypatch.chdir(tmp_path)
    layer = torch.nn.Linear(2, 2)
    checkpointer = Checkpointer("corpus/models/M16/save", recoverables={"model": layer})
    first = checkpointer.save_checkpoint(name="first")
    checkpointer.save_checkpoint(name="second")
    chosen = Path(first.path).resolve()
    assert chosen.is_absolute()
    _keep_only(Path("corpus/models/M16/save"), chosen)
    left = sorted(p.name for p in Path("corpus/models/M16/save").iterdir())
    assert left == ["CKPT+first"]
    with pytest.raises(RehearsalError, match="is not there; nothing was deleted"):
        _keep_only(Path("corpus/models/M16/save"), tmp_path / "corpus/models/M16/save/CKPT+second")
    assert sorted(p.name for p in Path("corpus/models/M16/save").iterdir()) == ["CKPT+first"]
