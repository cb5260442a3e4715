"""The demo tree is calibrated to the real SA outputs: its decodes' statistics (accuracy, error
correlation, vote gain, kinds of wrong words, how much the wrong words give the reference away) stay
within stated tolerances of the real files', and the README's table is what calibrate_demo.py
prints."""

import json
import subprocess
import sys

from calibrate_demo import REAL, TOLERANCE, real_statistics

from local.calibration import STATISTICS, confusion_fusion, speaker_statistics
from local.corpus import SPEAKERS

from conftest import RECIPE, check_table


def test_demo_tree_within_tolerance_and_the_readme_table(tmp_path):
    """Against docs/calibration_real.json (written by calibrate_demo.py from the real files), so
    that the check also runs where the real files are absent."""
    assert set(TOLERANCE) == set(STATISTICS)
    out = tmp_path / "results"
    proc = subprocess.run(
        [
            sys.executable,
            str(RECIPE / "calibrate_demo.py"),
            "--out",
            str(out / "calibration"),
            "--tree",
            str(tmp_path / "demo_data"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr  # every statistic within its tolerance
    assert "every statistic within its tolerance" in proc.stdout
    data = json.loads((out / "calibration" / "calibration.json").read_text())
    assert data["ok"] and set(data["demo"]) == {"M08", "M05", "M16", "M01"}
    # the wrong words of the demo teachers do not tell the reference (generator 7's did: a fusion
    # that learned the models' confusions on the teacher speakers beat the oracle of the same models),
    # nor do they with the number of pieces that a teacher-forced decode shows
    for speaker, demo in data["demo"].items():
        for name in ("learned-confusion fusion", "fusion, pieces known"):
            fused, real = demo[name], data["real"][speaker][name]
            assert fused < demo["oracle"], (speaker, name, fused, demo["oracle"])
            assert abs(fused - real) <= TOLERANCE[name], (speaker, name, fused, real)
    check_table("calibration", out)


def test_the_committed_real_statistics_are_the_real_files(shared_uaspeech):
    computed = real_statistics(shared_uaspeech / "cross_testing", shared_uaspeech / "sa_tokenizer.model")
    committed = json.loads(REAL.read_text())["statistics"]
    assert computed == committed


def test_rehearsal_calibration_needs_every_fold_speaker_and_says_so_in_one_line(tmp_path):
    """calibrate_demo.py --rehearsal on a cross-testing folder without the four held-out speakers'
    decodes (the tiny corpus's, or a partial cross stage): one line naming what to run, exit 1."""
    import subprocess
    import sys

    from conftest import RECIPE

    folder = _rehearsal_corpus(tmp_path, list(SPEAKERS)) / "F02"
    folder.mkdir(parents=True)
    rule = "=" * 80
    (folder / "wer_M16.txt").write_text(
        "%WER 0.00 [ 0 / 1, 0 ins, 0 del, 0 sub ]\n%SER 0.00 [ 0 / 1 ]\n"
        f"Scored 1 sentences, 0 not present in hyp.\n{rule}\nALIGNMENTS\n\nFormat:\n<utterance-id>, WER DETAILS\n"
        "<eps> ; reference  ; on ; the ; first ;  line\n  I   ;     S      ; =  ;  =  ;   S   ;   D  \n"
        f" and  ; hypothesis ; on ; the ; third ; <eps>\n{rule}\n"
        "M16_B3_D1_M5, %WER 0.00 [ 0 / 1, 0 ins, 0 del, 0 sub ]\nONE\n =  \nONE\n"
    )
    tokenizer = tmp_path / "tok.model"
    tokenizer.write_bytes(b"")
    proc = subprocess.run(
        [sys.executable, "calibrate_demo.py", "--rehearsal", str(tmp_path / "cross_testing"),
         "--tokenizer_file", str(tokenizer)],
        cwd=RECIPE, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"ERROR: {tmp_path / 'cross_testing'}: fewer than two models' decodes of M08's audio (the statistics "
        "need M08, M05, M16, M01: make_rehearsal.py --cross_speakers M08 M05 M16 M01)"
    ]


def _decodes(wrong_word, models=("F02", "F03", "F04"), words=("ALPHA", "BRAVO", "DELTA", "ECHO")):
    """Three models' decodes of each other's speakers' audio and of M01's: model m says
    ``wrong_word(m, word, k)`` for ``word`` on microphone k."""
    out = {}
    for m in models:
        for spk in [s for s in models if s != m] + ["M01"]:
            out[(m, spk)] = {f"{spk}_B3_{w}_M{k}": (wrong_word(m, w, k), w) for w in words for k in range(2, 6)}
    return out


class _NoPieces:
    """A first-piece function for texts without a tokenizer (every word is one piece)."""

    def __call__(self, text):
        return None

    def multi(self, text):
        return False

    def count(self, text):
        return 1


def test_learned_confusion_fusion_reads_a_shared_confusion_list():
    """The generator-7 leak in miniature: each word has one wrong word shared by every model, so
    the fusion fitted on the teacher speakers names the reference where every model is wrong (above
    the oracle); with wrong words that point back to no single reference it cannot."""
    shared = {"ALPHA": "BRAVO", "BRAVO": "DELTA", "DELTA": "ECHO", "ECHO": "ALPHA"}
    leak = _decodes(lambda m, w, k: shared[w])
    stats = speaker_statistics(leak, "M01", set(shared), _NoPieces())
    assert stats["oracle"] == 0.0 and stats["learned-confusion fusion"] == stats["fusion, pieces known"] == 100.0
    # an output that depends on the model and the microphone, not on the reference: chance (1 in 4)
    scattered = _decodes(lambda m, w, k: sorted(shared)[(k + len(m) + ord(m[-1])) % 4])
    stats = speaker_statistics(scattered, "M01", set(shared), _NoPieces())
    assert stats["learned-confusion fusion"] <= 25.0


def test_learned_confusion_fusion_is_fitted_on_the_teacher_speakers_only():
    """The held-out speaker's references cannot change what the fusion says on its audio."""
    shared = {"ALPHA": "BRAVO", "BRAVO": "DELTA", "DELTA": "ECHO", "ECHO": "ALPHA"}
    decodes = _decodes(lambda m, w, k: shared[w] if k % 2 else w)
    fused = confusion_fusion(decodes, "M01")
    relabelled = {
        pair: {u: (hyp, "ALPHA") for u, (hyp, _) in utts.items()} if pair[1] == "M01" else utts
        for pair, utts in decodes.items()
    }
    assert confusion_fusion(relabelled, "M01") == fused
    assert set(fused) == set(decodes[("F02", "M01")])
    # the fit changes when a teacher speaker's decodes do
    swapped = {
        pair: {u: (w, w) for u, (_, w) in utts.items()} if pair == ("F02", "F03") else utts
        for pair, utts in decodes.items()
    }
    assert confusion_fusion(swapped, "M01") != fused


def test_pieces_known_restricts_the_fusion_to_words_of_the_reference_length():
    """Told each reference's length (here in letters), an uninformative ensemble still finds the only
    word of four letters; without it, every utterance goes to the first word of the list."""
    decodes = _decodes(lambda m, w, k: "X")
    plain = confusion_fusion(decodes, "M01")
    known = confusion_fusion(decodes, "M01", pieces=len)
    assert set(plain.values()) == {"ALPHA"}
    assert {u for u, w in known.items() if w == "ECHO"} == {u for u in known if "_ECHO_" in u}
    assert {w for u, w in known.items() if "_ECHO_" not in u} == {"ALPHA"}


def test_a_folder_of_the_held_out_speakers_decodes_only_gives_no_fusion_statistics(shared_uaspeech, tmp_path):
    """A cross-testing folder with only some held-out speakers' decodes (make_rehearsal.py
    --cross_speakers) cannot fit the learned-confusion fusion (it learns on the teacher speakers'
    decodes): those statistics and the oracle beside them are left out of the statistics and of the
    table, the others are those of the full folder."""
    import shutil

    from calibrate_demo import comparison, table

    from local.calibration import FUSION_STATISTICS

    full = shared_uaspeech / "cross_testing"
    for path in full.glob("*/wer_M08.txt"):
        (tmp_path / path.parent.name).mkdir()
        shutil.copy(path, tmp_path / path.parent.name / path.name)
    tokenizer = shared_uaspeech / "sa_tokenizer.model"
    partial = real_statistics(tmp_path, tokenizer, speakers=("M08",))
    complete = real_statistics(full, tokenizer, speakers=("M08",))
    assert set(complete["M08"]) - set(partial["M08"]) == set(FUSION_STATISTICS)
    # the word list differs (only M08's references here): 'not a list word' may too
    same = [n for n in STATISTICS if n not in FUSION_STATISTICS and n != "not a list word"]
    assert {n: partial["M08"][n] for n in same} == {n: complete["M08"][n] for n in same}
    rows, _ = comparison(partial, json.loads(REAL.read_text())["statistics"])
    text = table(rows, "rehearsal")
    assert "first piece right" in text and not any(name in text for name in FUSION_STATISTICS)


# ----------------------------------------------------------------------------- calibrate_demo.py --rehearsal


def _rehearsal_corpus(root, speakers):
    """A rehearsal corpus's root as make_rehearsal.py marks it (REHEARSAL.json, corpus.json with
    ``speakers``); returns its empty cross_testing folder."""
    from local import data_kind

    root.mkdir(parents=True, exist_ok=True)
    (root / "corpus.json").write_text(json.dumps({"speakers": {s: {} for s in speakers}}), encoding="utf-8")
    data_kind.write_rehearsal_marker(root, {"corpus_fingerprint": "test"})
    (root / "cross_testing").mkdir()
    return root / "cross_testing"


def _calibrate(*args):
    return subprocess.run(
        [sys.executable, "calibrate_demo.py", *map(str, args)], cwd=RECIPE, capture_output=True, text=True, timeout=600
    )


def _one_error_line(proc):
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ERROR: "), proc.stderr
    return lines[0]


def _wer_text(results):
    """A SpeechBrain wer_*.txt of one-word utterances: [(utterance id, hypothesis, reference)]."""
    rule = "=" * 80
    wrong = sum(h != r for _, h, r in results)
    head = (
        f"%WER {100 * wrong / len(results):.2f} [ {wrong} / {len(results)}, 0 ins, 0 del, {wrong} sub ]\n"
        f"%SER {100 * wrong / len(results):.2f} [ {wrong} / {len(results)} ]\n"
        f"Scored {len(results)} sentences, 0 not present in hyp.\n{rule}\nALIGNMENTS\n\nFormat:\n"
        "<utterance-id>, WER DETAILS\n<eps> ; reference  ; on ; the ; first ;  line\n"
        "  I   ;     S      ; =  ;  =  ;   S   ;   D  \n and  ; hypothesis ; on ; the ; third ; <eps>\n"
    )
    body = "".join(
        f"{rule}\n{u}, %WER {100.0 * (h != r):.2f} [ {int(h != r)} / 1, 0 ins, 0 del, {int(h != r)} sub ]\n"
        + "\n".join(x.center(max(len(h), len(r))) for x in (r, "=" if h == r else "S", h))
        + "\n"
        for u, h, r in results
    )
    return head + body


def test_rehearsal_calibration_refuses_a_folder_not_marked_as_rehearsal(shared_uaspeech, tmp_path):
    """The real SA cross-testing folder (or any folder whose corpus has no REHEARSAL.json) is not
    measured as "rehearsal": one line naming the folder and the marker, exit 1."""
    tokenizer = shared_uaspeech / "sa_tokenizer.model"
    real = shared_uaspeech / "cross_testing"
    line = _one_error_line(_calibrate("--rehearsal", real, "--tokenizer_file", tokenizer, "--speakers", "M08", "M16"))
    assert str(real) in line and "REHEARSAL.json" in line and "not the cross_testing folder of a rehearsal" in line
    # a corpus.json alone does not make a rehearsal corpus
    unmarked = tmp_path / "corpus" / "cross_testing" / "F02"
    unmarked.mkdir(parents=True)
    (tmp_path / "corpus" / "corpus.json").write_text(json.dumps({"speakers": {"F02": {}, "M08": {}}}))
    (unmarked / "wer_M08.txt").write_bytes((real / "F02" / "wer_M08.txt").read_bytes())
    line = _one_error_line(
        _calibrate("--rehearsal", unmarked.parent, "--tokenizer_file", tokenizer, "--speakers", "M08")
    )
    assert "REHEARSAL.json" in line and str(tmp_path / "corpus") in line


def test_rehearsal_calibration_refuses_a_partial_cross_stage(shared_uaspeech, tmp_path):
    """2 of the 14 models' decodes of M08 (a killed cross stage): one line naming the speaker and
    the 12 missing models, exit 1, not a table said to be within tolerance; a speaker the corpus does
    not have: one line too."""
    cross = _rehearsal_corpus(tmp_path / "corpus", list(SPEAKERS))
    for model in ("F02", "F03"):
        (cross / model).mkdir()
        (cross / model / "wer_M08.txt").write_bytes(
            (shared_uaspeech / "cross_testing" / model / "wer_M08.txt").read_bytes()
        )
    tokenizer = shared_uaspeech / "sa_tokenizer.model"
    proc = _calibrate("--rehearsal", cross, "--tokenizer_file", tokenizer, "--speakers", "M08", "--out", tmp_path / "o")
    line = _one_error_line(proc)
    missing = [s for s in SPEAKERS if s not in ("F02", "F03", "M08")]
    assert "M08" in line and "12 of the 14" in line and ", ".join(missing) in line, line
    assert "tolerance" not in proc.stdout and not (tmp_path / "o").exists()
    small = _rehearsal_corpus(tmp_path / "small", ["F02", "F03", "M16"])
    line = _one_error_line(_calibrate("--rehearsal", small, "--tokenizer_file", tokenizer, "--speakers", "M08"))
    assert "M08 is not a speaker of the rehearsal corpus (F02, F03, M16" in line


def test_rehearsal_calibration_says_what_it_could_not_compute(shared_uaspeech, tmp_path):
    """The tiny corpus (3 speakers, M16 held out): one pair of models, one of them right on every
    word, gives no phi: null in calibration.json (valid JSON), a dash in the table, a line saying so,
    not counted as within its tolerance. A rerun into its own folder replaces its own files."""
    cross = _rehearsal_corpus(tmp_path / "corpus", ["F02", "M07", "M16"])
    words = ["ALPHA", "BRAVO", "DELTA", "ECHO", "GOLF", "HOTEL"]
    ids = [(f"M16_B3_W{i}_M{k}", w) for i, w in enumerate(words) for k in (2, 3)]
    for model, hyp in (("F02", lambda n, w: w if n % 3 else "ALPHA"), ("M07", lambda n, w: w)):
        (cross / model).mkdir()
        results = [(u, hyp(n, w), w) for n, (u, w) in enumerate(ids)]
        (cross / model / "wer_M16.txt").write_text(_wer_text(results), encoding="utf-8")
    out = tmp_path / "out"
    args = ("--rehearsal", cross, "--tokenizer_file", shared_uaspeech / "sa_tokenizer.model", "--speakers", "M16")
    for _ in range(2):
        proc = _calibrate(*args, "--out", out)
        assert proc.returncode == 0 and not proc.stderr.strip(), proc.stdout + proc.stderr
        assert "M16 phi: could not be computed" in proc.stdout
        assert proc.stdout.strip().splitlines()[-1] == "NOT every statistic within its tolerance"
        phi_row = next(line for line in proc.stdout.splitlines() if line.startswith("| phi"))
        assert "| – / " in phi_row and "nan" not in proc.stdout.lower()

        def no_constant(name):
            raise AssertionError(f"{name} in calibration.json")

        data = json.loads((out / "calibration.json").read_text(), parse_constant=no_constant)
        assert data["rehearsal"]["M16"]["phi"] is None and data["ok"] is False
        assert "| – / " in (out / "calibration.md").read_text()


def test_calibration_out_refuses_a_file_and_other_peoples_files(tmp_path):
    """--out naming a file, or a folder holding a calibration.json/.md this job did not write: one
    line, exit 1, before anything is computed, the files unchanged; what this job wrote (also before
    it recorded ``written_by``) may be replaced."""
    afile = tmp_path / "afile"
    afile.write_text("mine\n")
    line = _one_error_line(_calibrate("--out", afile, "--tree", tmp_path / "tree"))
    assert str(afile) in line and "not a folder" in line and afile.read_text() == "mine\n"
    _one_error_line(_calibrate("--out", afile / "sub", "--tree", tmp_path / "tree"))
    for files in ({"calibration.json": '{"mine": 1}\n'}, {"calibration.md": "my notes\n"}):
        folder = tmp_path / f"own{len(str(files))}"
        folder.mkdir()
        for name, text in files.items():
            (folder / name).write_text(text)
        line = _one_error_line(_calibrate("--out", folder, "--tree", tmp_path / "tree"))
        assert str(folder) in line and "not overwritten" in line
        assert {p.name: p.read_text() for p in folder.iterdir()} == files
    assert not (tmp_path / "tree").exists()  # refused before the demo tree was made
    from calibrate_demo import check_out

    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "calibration.json").write_text(json.dumps({"demo": {}, "real": {}, "tolerance": {}, "ok": True}))
    (legacy / "calibration.md").write_text("| table |\n")
    check_out(legacy)
