"""The later stages of the rehearsal corpus (``make_rehearsal.py``): the inputs of the recipe, made
by the recipe's own jobs from the SA models the ``models`` stage trained.

- ``logits``: ``extract_logits.py`` with every model on every speaker's B3 (the layout and the
  metadata of the real extraction; decoder logits only, ``--ctc none``: no job of the study reads
  the CTC files, which would be about ten times the size), into ``<corpus>/logit_extraction``.
- ``cross``: every model's beam search + CTC + LM decode of every other speaker's B3, with the
  models' own ``test_search`` settings except the beam (``cross_beam``, below 66 for the time it
  takes on CPU) and the partial CTC scoring (``local/free_running.py``), written as SpeechBrain
  ``wer_*.txt`` files in the layout of the SA project's cross-testing files:
  ``<corpus>/cross_testing/<MODEL>/wer_<SPK>.txt``; ``decoding.json`` beside them says how.

Each stage is resumable (a finished pair or file is not redone; a half-written one never appears)
and records its seconds and bytes in ``corpus.json``; a rerun with other settings is refused.
Before writing anything, both stages check that the corpus holds a finished audio stage
(``check_audio_stage``) and that every model is finished and was trained on this corpus with this
tokenizer (``check_models``); the cross stage also refuses decodes of another tokenizer
(``decoding.json`` records its checksum) and a damaged or incomplete existing ``wer_<SPK>.txt``.
"""

import json
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from local import data_kind
from local.files import write_json
from local.rehearsal_audio import MANIFEST, RehearsalError

LOGITS = "logit_extraction"
CROSS = "cross_testing"
DECODING_FILE = "decoding.json"


def folder_size(folder):
    """(bytes, files) under ``folder``."""
    total, count = 0, 0
    for root, _, names in os.walk(folder):
        for name in names:
            total += os.stat(os.path.join(root, name)).st_size
            count += 1
    return total, count


class AlreadyReported(RehearsalError):
    """A failure whose one ``ERROR:`` line a job run in this process has printed already."""


def record_stage(corpus, stage, info):
    """Adds ``info`` (seconds, bytes, ...) of ``stage`` to ``corpus.json``'s ``stages``; a stage
    resumed or rerun keeps the sum of its runs' seconds (``seconds_all_runs``): a rerun that finds
    everything done costs nearly nothing and must not hide what building it cost."""
    path = Path(corpus) / MANIFEST
    manifest = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    old = manifest.setdefault("stages", {}).get(stage, {})
    if "seconds" in info and stage != "all":
        info = {
            **info,
            "seconds_all_runs": round(old.get("seconds_all_runs", old.get("seconds", 0)) + info["seconds"], 1),
        }
    manifest["stages"][stage] = info
    write_json(path, manifest)


def stage_table(corpus):
    """The stages' seconds and sizes recorded in ``corpus.json``, as a small table."""
    from local.tables import text_table

    manifest = json.loads((Path(corpus) / MANIFEST).read_text(encoding="utf-8"))
    rows = []
    for name, info in manifest.get("stages", {}).items():
        if name == "all":
            continue
        size = info.get("bytes")
        # the models stage skips finished models: the time that trained them is in their manifest
        seconds = info.get("trained_seconds", info.get("seconds_all_runs", info.get("seconds", 0)))
        rows.append(
            [name, f"{seconds:.0f}", f"{info.get('seconds', 0):.0f}", "" if size is None else f"{size / 1e6:.0f}"]
        )
    return text_table(["stage", "seconds to build", "this run", "MB"], rows)


def speakers_of(corpus):
    """The corpus's speakers (those with a test CSV), in the recipe's order."""
    from local.corpus import SPEAKERS

    found = [s for s in SPEAKERS if (Path(corpus) / "csv" / f"{s}.csv").is_file()]
    if not found:
        raise RehearsalError(f"{corpus} holds no speaker CSV (csv/<SPK>.csv): build the audio stage first")
    return found


def model_folders(models_dir, speakers):
    """{speaker: SA experiment folder} of the models stage (``<models>/<SPK>/hyperparams.yaml``,
    ``save/``); RehearsalError naming the first that is missing."""
    folders = {}
    for spk in speakers:
        folder = Path(models_dir) / spk
        if not (folder / "hyperparams.yaml").is_file() or not (folder / "save").is_dir():
            raise RehearsalError(f"no SA model of {spk} in {folder}: build the models stage first")
        folders[spk] = folder
    return folders


def read_json_file(path, what):
    """The JSON object of ``path``; RehearsalError (one line naming the file) when it is absent,
    unreadable or damaged."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RehearsalError(f"{path} does not exist ({what})") from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise RehearsalError(f"{path} is unreadable or damaged ({what}: {err}); nothing was overwritten") from None
    if not isinstance(data, dict):
        raise RehearsalError(f"{path} is damaged ({what}: not a JSON object); nothing was overwritten")
    return data


def check_audio_stage(corpus):
    """The corpus's ``corpus.json`` (its manifest), when ``corpus`` holds a finished audio stage of a
    rehearsal corpus (``corpus.json`` with its ``stages.audio`` record and the audio stage's record
    of the same fingerprint); RehearsalError (one line) otherwise. The later stages need it."""
    from local.rehearsal_audio import STAGE_FILE

    corpus = Path(corpus)
    hint = "build the audio stage first (make_rehearsal.py --stage audio)"
    if not (corpus / MANIFEST).is_file():
        raise RehearsalError(f"{corpus} holds no rehearsal corpus ({MANIFEST} is missing): {hint}")
    manifest = read_json_file(corpus / MANIFEST, "the corpus's manifest")
    if "audio" not in manifest.get("stages", {}) or not (corpus / STAGE_FILE).is_file():
        raise RehearsalError(f"{corpus} holds no finished audio stage of a rehearsal corpus ({MANIFEST}): {hint}")
    record = read_json_file(corpus / STAGE_FILE, "the audio stage's record")
    if record.get("fingerprint") != manifest.get("fingerprint"):
        raise RehearsalError(
            f"{corpus}: {MANIFEST} and {STAGE_FILE} are of different corpora (fingerprints differ): {hint}"
        )
    return manifest


def _sha256(path):
    from local.rehearsal_models import _sha256 as sha256  # the models stage's checksum of a file

    return sha256(path)


def check_models(corpus, models_dir, speakers, tokenizer_file):
    """The models stage's SA models of ``speakers`` are finished (``rehearsal_model.json`` of this
    configuration in each folder) and were made from this corpus (its CSVs' checksums in
    ``rehearsal_models.json``) with this tokenizer (its checksum there and their ``tokenizer.ckpt``);
    RehearsalError (one line naming the model or file) otherwise. Returns {speaker: folder}."""
    from types import SimpleNamespace

    from local.rehearsal_models import BLOCKS, DONE, _fingerprint, _record_matches
    from local.rehearsal_models import MANIFEST as MODELS_MANIFEST

    folders = model_folders(models_dir, speakers)
    path = Path(models_dir) / MODELS_MANIFEST
    if not path.is_file():
        raise RehearsalError(f"{models_dir} has no {MODELS_MANIFEST}: not the models stage's folder (build it first)")
    config = read_json_file(path, "the models stage's record").get("config")
    if not isinstance(config, dict) or not isinstance(config.get("csv_sha256"), dict):
        raise RehearsalError(f"{path} is damaged (no config.csv_sha256); nothing was overwritten")
    for spk in speakers:
        for block in BLOCKS:
            csv = Path(corpus) / "csv" / f"{spk}_{block}.csv"
            if config["csv_sha256"].get(f"{spk}_{block}") != (_sha256(csv) if csv.is_file() else None):
                raise RehearsalError(
                    f"--models_dir {models_dir}: its models were not trained on this corpus ({csv} differs from "
                    f"the one {MODELS_MANIFEST} records): give this corpus's models"
                )
    digest = _sha256(tokenizer_file)
    if config.get("tokenizer_sha256") != digest:
        raise RehearsalError(
            f"--tokenizer_file {tokenizer_file} is not the tokenizer the models in {models_dir} were trained with "
            f"({MODELS_MANIFEST} records another checksum)"
        )
    plan = SimpleNamespace(config=config)
    for spk, folder in folders.items():
        done = folder / DONE
        if not done.is_file():
            raise RehearsalError(
                f"SA model {spk} in {folder} is unfinished (no {DONE}): finish the models stage (--stage models)"
            )
        if read_json_file(done, f"model {spk}'s record").get("fingerprint") != _fingerprint(plan, "sa", spk):
            raise RehearsalError(f"SA model {spk} in {folder} is not of the configuration {MODELS_MANIFEST} records")
        # its checkpoint's files as they were when it finished (sizes and checksums it recorded)
        _record_matches(folder, _fingerprint(plan, "sa", spk))
        ckpt = folder / "save" / "tokenizer.ckpt"
        if not ckpt.is_file() or _sha256(ckpt) != digest:
            raise RehearsalError(
                f"--tokenizer_file {tokenizer_file} is not the tokenizer of SA model {spk} "
                f"({ckpt} differs or is missing)"
            )
    return folders


def mark(corpus):
    """``REHEARSAL.json`` at the corpus root: every job reading its logit tree or its cross-testing
    files then labels its figures "synthetic speech, real models" (local/data_kind.py)."""
    manifest = json.loads((Path(corpus) / "corpus.json").read_text(encoding="utf-8"))
    data_kind.write_rehearsal_marker(corpus, {"corpus_fingerprint": manifest.get("fingerprint")})


def extract(corpus, models_dir, tokenizer_file, batch_size=16, device="cpu", log=print):
    """The ``logits`` stage: ``extract_logits.py`` on every (model, speaker) pair. Returns its
    record (seconds, bytes)."""
    import extract_logits

    started = time.monotonic()
    check_audio_stage(corpus)
    speakers = speakers_of(corpus)
    folders = check_models(corpus, models_dir, speakers, tokenizer_file)
    root = Path(corpus) / LOGITS
    argv = [
        "--logit_root",
        str(root),
        "--tokenizer_file",
        str(tokenizer_file),
        "--data_root",
        str(corpus),
        "--device",
        device,
        "--batch_size",
        str(batch_size),
        "--ctc",
        "none",
        "--pairs",
        "all",
        "--models",
        *(f"{s}={f / 'hyperparams.yaml'}:{f / 'save'}" for s, f in folders.items()),
        "--speakers",
        *(f"{s}={Path(corpus) / 'csv' / f'{s}.csv'}" for s in speakers),
    ]
    # every speaker's test CSV and recordings, checked before anything is written
    for spk in speakers:
        check_test_audio(corpus, spk)
    log(f"logits: extract_logits.py, {len(speakers)} models x {len(speakers)} speakers -> {root}")
    mark(corpus)
    status = extract_logits.main(argv)
    if status != 0:  # extract_logits.py has printed its one ERROR line, naming the pair
        raise AlreadyReported(f"extract_logits.py failed (exit status {status})")
    size, files = folder_size(root)
    info = {"seconds": round(time.monotonic() - started, 1), "bytes": size, "files": files, "batch_size": batch_size}
    record_stage(corpus, "logits", info)
    log(f"logits stage: {info['seconds']:.1f} s, {size / 1e6:.1f} MB in {files} files")
    return info


def decoding_record(hparams_file, beam_size, ctc_scoring, scorer_beam_scale):
    """How the cross-testing files are decoded: the models' test_search settings with ``beam_size``."""
    from local.free_running import search_settings

    settings, source = search_settings(hparams_file)
    settings["beam_size"] = int(beam_size)
    return {
        "search": "beam",
        "settings": settings,
        "settings_from": source,
        "ctc_scoring": ctc_scoring,
        "scorer_beam_scale": scorer_beam_scale,
        "note": "beam search + CTC + TransformerLM of each SA model alone on another speaker's B3 "
        "(SpeechBrain S2STransformerBeamSearcher), a smaller beam than the SA pipeline's 66",
    }


def cross_decodes(
    corpus,
    models_dir,
    tokenizer_file,
    beam_size=8,
    batch_size=16,
    ctc_scoring="partial",
    scorer_beam_scale=2.0,
    jobs=2,
    device="cpu",
    progress=True,
    log=print,
    audio_speakers=None,
):
    """The ``cross`` stage: every model decodes every other speaker's B3 (beam + CTC + LM). One
    worker process per model at a time (``jobs`` of them, one torch thread each); a finished
    ``wer_<SPK>.txt`` is not redone. Returns the stage's record."""
    from tqdm import tqdm

    started = time.monotonic()
    check_audio_stage(corpus)
    speakers = speakers_of(corpus)
    folders = check_models(corpus, models_dir, speakers, tokenizer_file)
    out = Path(corpus) / CROSS
    record = decoding_record(folders[speakers[0]] / "hyperparams.yaml", beam_size, ctc_scoring, scorer_beam_scale)
    record["tokenizer_sha256"] = _sha256(tokenizer_file)
    path = out / DECODING_FILE
    if path.is_file():
        old = read_json_file(path, "how the cross-testing files were decoded")
        # a record of before the tokenizer was recorded: its tokenizer is the models' (checked above)
        old.setdefault("tokenizer_sha256", record["tokenizer_sha256"])
        if old != record:
            what = "another tokenizer" if old["tokenizer_sha256"] != record["tokenizer_sha256"] else "other settings"
            raise RehearsalError(
                f"{out} holds decodes made with {what} ({DECODING_FILE}): remove the folder to redo them"
            )
    # Every model on every other speaker's B3, or on the audio of the given speakers only (e.g. the
    # four held-out speakers of the folds: what compare.py and the calibration statistics read).
    audio = speakers if audio_speakers is None else [s for s in speakers if s in set(audio_speakers)]
    missing = sorted(set(audio_speakers or ()) - set(speakers))
    if missing:
        raise RehearsalError(f"--cross_speakers: {', '.join(missing)} not in the corpus ({', '.join(speakers)})")
    # an existing wer file is a finished decode only when it is whole: refused (not kept) otherwise
    for spk in audio:
        expected = None
        for model in speakers:
            wer = out / model / f"wer_{spk}.txt"
            if model != spk and wer.is_file():
                expected = expected if expected is not None else speaker_test_ids(corpus, spk)
                check_wer_file(wer, expected)
    todo = {m: [s for s in audio if s != m and not (out / m / f"wer_{s}.txt").is_file()] for m in speakers}
    # the test CSVs and recordings of the decodes to make, checked before anything is written (the
    # workers read them one speaker at a time: a bad one would stop them after other files)
    for spk in sorted({s for targets in todo.values() for s in targets}):
        check_test_audio(corpus, spk)
    out.mkdir(parents=True, exist_ok=True)
    mark(corpus)
    write_json(path, record)
    todo = {m: s for m, s in todo.items() if s}
    total = sum(len(s) for s in todo.values())
    wanted = sum(1 for m in speakers for s in audio if s != m)
    log(
        f"cross: {total} of {wanted} model/speaker decodes to make (beam {beam_size}, "
        f"CTC {ctc_scoring}, {jobs} process(es)) -> {out}"
    )
    bar = tqdm(total=total, unit="decode", desc="cross", disable=not progress, dynamic_ncols=True)
    args = (str(corpus), str(tokenizer_file), beam_size, batch_size, ctc_scoring, scorer_beam_scale, device)
    try:
        if jobs == 1 or len(todo) <= 1:
            for model, targets in todo.items():
                for _ in _decode_model(model, str(folders[model]), targets, *args):
                    bar.update(1)
        else:
            with ProcessPoolExecutor(max_workers=jobs, initializer=_one_thread) as pool:
                futures = {
                    pool.submit(_decode_model_all, m, str(folders[m]), targets, *args): len(targets)
                    for m, targets in todo.items()
                }
                for future in as_completed(futures):
                    future.result()
                    bar.update(futures[future])
    finally:
        bar.close()
    size, files = folder_size(out)
    info = {
        "seconds": round(time.monotonic() - started, 1),
        "bytes": size,
        "files": files,
        "decodes_made": total,
        "audio_speakers": audio,
        "beam_size": beam_size,
        "ctc_scoring": ctc_scoring,
        "jobs": jobs,
    }
    record_stage(corpus, "cross", info)
    log(f"cross stage: {info['seconds']:.1f} s, {total} decodes, {size / 1e6:.1f} MB in {files} files")
    return info


def speaker_test_ids(corpus, speaker):
    """The utterance ids of ``speaker``'s test CSV (``csv/<SPK>.csv``, the B3 the cross stage decodes)."""
    from local.sa_models import ExtractionError, read_speaker_csv

    try:
        return {u.id for u in read_speaker_csv(Path(corpus) / "csv" / f"{speaker}.csv", speaker, data_root=corpus)}
    except ExtractionError as err:
        raise RehearsalError(str(err)) from None


def check_test_audio(corpus, speaker):
    """RehearsalError (one line naming the file and the utterance) unless ``speaker``'s test CSV and
    every recording it lists can be read and agree (local/sa_models.py: read_speaker_csv, check_audio)."""
    from local.sa_models import ExtractionError, check_audio, read_speaker_csv

    try:
        check_audio(read_speaker_csv(Path(corpus) / "csv" / f"{speaker}.csv", speaker, data_root=corpus))
    except ExtractionError as err:
        raise RehearsalError(str(err)) from None


def check_wer_file(path, expected):
    """RehearsalError (one line naming the file) unless the wer file ``path`` parses and holds
    exactly the utterances ``expected`` (ids)."""
    from local.wer_files import read_wer_file

    try:
        found = set(read_wer_file(path).ids)
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise RehearsalError(
            f"{path} is damaged ({str(err).splitlines()[0][:200]}): remove it to decode it again"
        ) from None
    if found != expected:
        raise RehearsalError(
            f"{path} is incomplete ({len(found & expected)} of the {len(expected)} test utterances, "
            f"{len(found - expected)} others): remove it to decode it again"
        )


def _one_thread():
    import torch

    torch.set_num_threads(1)


def _decode_model_all(*args):
    for _ in _decode_model(*args):
        pass


def _decode_model(
    model_name, folder, targets, corpus, tokenizer_file, beam_size, batch_size, ctc_scoring, scale, device
):
    """Decodes ``targets`` (speakers) with one SA model; yields after each file is written."""
    import torch

    from local.free_running import decode_utterances, search_settings, single_model_systems, write_wer_file
    from local.sa_models import SAModel, load_language_model, read_speaker_csv, set_tf32
    from local.store import load_tokenizer

    set_tf32(False)
    folder = Path(folder)
    tokenizer = load_tokenizer(tokenizer_file)
    model = SAModel(model_name, folder / "hyperparams.yaml", folder / "save", device=device)
    settings, _ = search_settings(folder / "hyperparams.yaml")
    settings["beam_size"] = int(beam_size)
    lm = load_language_model(folder / "hyperparams.yaml", folder / "save" / "lm.ckpt", device)
    systems = single_model_systems({model_name: model})
    for spk in targets:
        utts = read_speaker_csv(Path(corpus) / "csv" / f"{spk}.csv", spk, data_root=corpus)
        with torch.no_grad():
            hyps = decode_utterances(
                utts,
                systems,
                ("beam",),
                settings,
                lm,
                batch_size=batch_size,
                ctc_scoring=ctc_scoring,
                scorer_beam_scale=scale,
                progress=False,
            )
        write_wer_file(Path(corpus) / CROSS / model_name / f"wer_{spk}.txt", utts, hyps["beam"][model_name], tokenizer)
        yield spk
