"""A speaker's SpeechBrain CSV and its audio, as every stage reads them (local/sa_models.py:
read_speaker_csv, audio_info, check_audio, read_wav): a malformed row, a bad duration, a row of
another speaker, a truncated recording or one whose length disagrees with its CSV duration is
refused with one ExtractionError naming the file, the line or the utterance, before anything runs.
The SA project's own CSV format (ID,duration,wav,spk_id,wrd, the id being the wav's name and the
duration its num_frames / sample_rate) is read as before."""

from pathlib import Path

import numpy as np
import pytest

from local.sa_models import ExtractionError, audio_info, check_audio, read_speaker_csv

HEADER = "ID,duration,wav,spk_id,wrd"
RATE = 16000
# (utterance id, word, samples): two recordings of M16, one of F02
RECORDINGS = [("M16_B1_D1_M5", "ONE", 8000), ("M16_B1_LA_M5", "ALPHA", 12000), ("F02_B1_D1_M5", "ONE", 9600)]


@pytest.fixture
def corpus(tmp_path):
    """<tmp>/audio/<SPK>/<ID>.wav (16 kHz mono PCM_16) and M16.csv with $data_root paths."""
    import soundfile

    gen = np.random.default_rng(0)
    for utt, _, n in RECORDINGS:
        path = tmp_path / "audio" / utt[:3] / f"{utt}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        soundfile.write(path, (0.1 * gen.standard_normal(n)).astype("float32"), RATE, subtype="PCM_16")
    return tmp_path


def row(utt, word, n, spk=None, duration=None, wav=None):
    spk = spk or utt[:3]
    duration = n / RATE if duration is None else duration
    return f"{utt},{duration},{wav or f'$data_root/audio/{utt[:3]}/{utt}.wav'},{spk},{word}"


def write_csv(folder, rows, name="M16.csv"):
    csv = folder / name
    csv.write_text(HEADER + "\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return csv


def good_rows():
    return [row(*r) for r in RECORDINGS[:2]]


def refused(csv, corpus, *words, speaker="M16"):
    """read_speaker_csv and then check_audio: one ExtractionError, one line, naming ``words``."""
    with pytest.raises(ExtractionError) as err:
        check_audio(read_speaker_csv(csv, speaker, corpus))
    message = str(err.value)
    assert "\n" not in message, message
    for word in words:
        assert word in message, (word, message)
    return message


def test_the_sa_csv_format_is_read(corpus):
    """The SA pipeline's CSV (exact durations, the id as the wav's name) and a CSV whose wavs are
    named otherwise (as tests/fixtures/audio) are read, in ascending-duration order."""
    csv = write_csv(corpus, [row("M16_B1_LA_M5", "ALPHA", 12000), row("M16_B1_D1_M5", "ONE", 8000)])
    utts = read_speaker_csv(csv, "M16", corpus)
    assert [u.id for u in utts] == ["M16_B1_D1_M5", "M16_B1_LA_M5"]
    assert check_audio(utts) == {"M16_B1_D1_M5": 8000, "M16_B1_LA_M5": 12000}
    (corpus / "alpha.wav").write_bytes((corpus / "audio" / "M16" / "M16_B1_LA_M5.wav").read_bytes())
    # a duration within the tolerance (rounded) and a wav not named as an utterance
    csv = write_csv(corpus, [row("M16_B1_LA_M5", "ALPHA", 12000, duration=0.78, wav=str(corpus / "alpha.wav"))])
    assert check_audio(read_speaker_csv(csv, "M16")) == {"M16_B1_LA_M5": 12000}


@pytest.mark.parametrize("fields", ["cut", "extra"])
def test_a_row_of_too_few_or_too_many_fields_is_refused(corpus, fields):
    """Case 6: SpeechBrain's reader failed with a TypeError (got 'NoneType' / 'list')."""
    rows = good_rows()
    if fields == "cut":  # line 3
        rows[1] = ",".join(rows[1].split(",")[:3])
        words = ("line 3", "utterance M16_B1_LA_M5", "3 field(s)")
    else:  # line 2, its unclosed quote swallowing line 3
        rows[0] += ',"extra'
        words = ("line 2", "utterance M16_B1_D1_M5", "6 field(s)", "an unclosed quote runs on to line 3")
    csv = write_csv(corpus, rows)
    refused(csv, corpus, str(csv), *words, "the header has 5")


@pytest.mark.parametrize("duration", ["-1", "0", "nan", "inf", "abc"])
def test_a_duration_that_is_not_a_finite_positive_number_is_refused(corpus, duration):
    """Case 8: -1 and nan were accepted (and trained on)."""
    rows = good_rows()
    rows[0] = row("M16_B1_D1_M5", "ONE", 8000, duration=duration)
    csv = write_csv(corpus, rows)
    refused(csv, corpus, str(csv), "line 2", "utterance M16_B1_D1_M5", f"duration {duration!r}", "finite positive")


def test_a_row_of_another_speaker_is_refused(corpus):
    """Case 8: spk_id F02 in M16's CSV, and an M16 row whose wav is F02's recording, were accepted."""
    rows = good_rows()
    rows[1] = row("M16_B1_LA_M5", "ALPHA", 12000, spk="F02")
    csv = write_csv(corpus, rows)
    refused(csv, corpus, str(csv), "line 3", "utterance M16_B1_LA_M5", "spk_id 'F02'", "speaker M16")

    rows = good_rows()
    rows[0] = row("M16_B1_D1_M5", "ONE", 9600, wav="$data_root/audio/F02/F02_B1_D1_M5.wav")
    csv = write_csv(corpus, rows)
    refused(csv, corpus, str(csv), "line 2", "utterance M16_B1_D1_M5", "speaker F02's recording F02_B1_D1_M5")

    rows = good_rows()  # M16's other recording
    rows[0] = row("M16_B1_D1_M5", "ONE", 12000, wav="$data_root/audio/M16/M16_B1_LA_M5.wav")
    refused(write_csv(corpus, rows), corpus, "utterance M16_B1_D1_M5", "another utterance's recording M16_B1_LA_M5")


def test_a_truncated_recording_is_refused(corpus):
    """Case 9: libsndfile reads a truncated wav as a shorter one, and every stage went on (exit 0)."""
    wav = corpus / "audio" / "M16" / "M16_B1_LA_M5.wav"
    with open(wav, "r+b") as handle:
        handle.truncate(2000)
    csv = write_csv(corpus, good_rows())
    refused(csv, corpus, str(wav), "utterance M16_B1_LA_M5", "truncated", "declares 24000 bytes")
    utt = next(u for u in read_speaker_csv(csv, "M16", corpus) if u.id == "M16_B1_LA_M5")
    utt.duration = None  # the header's own length alone is checked too
    with pytest.raises(ExtractionError, match="is truncated"):
        audio_info(utt)


def test_a_recording_that_disagrees_with_its_duration_is_refused(corpus):
    """Case 9: a CSV duration more than 0.1 s from the recording's length (a recording replaced by
    a shorter one of the right format, or the wrong duration)."""
    rows = good_rows()
    rows[1] = row("M16_B1_LA_M5", "ALPHA", 12000, duration=0.9)
    csv = write_csv(corpus, rows)
    message = refused(csv, corpus, "utterance M16_B1_LA_M5", "M16_B1_LA_M5.wav", "lasts 0.750 s", "0.9 s")
    assert "0.1 s" in message


def test_read_wav_checks_the_recording(corpus):
    """read_wav (the models' reader) refuses a truncated recording too."""
    from local.sa_models import read_wav

    class Model:
        sample_rate = RATE

    utts = read_speaker_csv(write_csv(corpus, good_rows()), "M16", corpus)
    assert len(read_wav(utts[0], Model())) == 8000
    wav = Path(utts[1].wav)
    wav.write_bytes(wav.read_bytes()[:-1000])
    with pytest.raises(ExtractionError, match="M16_B1_LA_M5.*truncated"):
        read_wav(utts[1], Model())


def test_the_rehearsal_models_stage_checks_the_recordings(tmp_path):
    """The models stage (local/rehearsal_models.read_corpus) reads every B1-B3 CSV before training:
    a truncated recording, or one that disagrees with its CSV duration, stops it there (case 9: it
    trained on what was left, exit 0)."""
    import soundfile

    from local.rehearsal_models import RehearsalError, read_corpus

    rows = {}
    for block, key in (("B1", "D1"), ("B2", "LA"), ("B3", "C1")):
        utt = f"M16_{block}_{key}_M5"
        path = tmp_path / "audio" / "M16" / f"{utt}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        soundfile.write(path, np.zeros(8000, dtype="float32"), RATE, subtype="PCM_16")
        rows[block] = row(utt, "ONE" if key == "D1" else "ALPHA" if key == "LA" else "COMMAND", 8000)
    (tmp_path / "csv").mkdir()
    for block, text in rows.items():
        write_csv(tmp_path / "csv", [text], f"M16_{block}.csv")
    assert read_corpus(tmp_path, ["M16"]).counts == {"M16": {"B1": 1, "B2": 1, "B3": 1}}
    wav = tmp_path / "audio" / "M16" / "M16_B2_LA_M5.wav"
    wav.write_bytes(wav.read_bytes()[:2000])
    with pytest.raises(RehearsalError, match=r"M16_B2\.csv, utterance M16_B2_LA_M5: .*is truncated"):
        read_corpus(tmp_path, ["M16"])
    soundfile.write(wav, np.zeros(4000, dtype="float32"), RATE, subtype="PCM_16")  # 0.25 s, the CSV says 0.5 s
    with pytest.raises(RehearsalError, match=r"M16_B2_LA_M5: .*lasts 0\.250 s, its CSV duration is 0\.5 s"):
        read_corpus(tmp_path, ["M16"])
