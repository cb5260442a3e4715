"""The logit store: reads the extraction in place, in both on-disk forms, and refuses bad input
with one clear message naming the file, the speaker and the utterance."""

import json
import shutil

import pytest
import torch

from local.store import LogitStore, LogitStoreError, TokenTable, load_tokenizer
from local.synthetic import generate_tree

PAIRS = [("F02", "F02"), ("M05", "M05")]


def _tokens(tree):
    return TokenTable(load_tokenizer(tree / "tokenizer.model"))


def _open(tree, pairs=PAIRS):
    return LogitStore(tree / "logit_extraction", _tokens(tree), pairs)


def _meta_path(tree, spk):
    return tree / "logit_extraction" / spk / spk / f"{spk}_metadata.json"


def _dec_path(tree, spk):
    return tree / "logit_extraction" / spk / spk / f"{spk}_decoder_logits.pt"


def _edit_meta(tree, spk, edit):
    path = _meta_path(tree, spk)
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))
    return meta


def _edit_logits(tree, spk, edit):
    path = _dec_path(tree, spk)
    logits = torch.load(path, weights_only=True)
    logits = edit(logits)
    torch.save(logits, path)


def test_store_packs_every_stream_exactly(demo_tree):
    store = _open(demo_tree)
    tokens = store.tokens
    for spk in ("F02", "M05"):
        meta = json.loads(_meta_path(demo_tree, spk).read_text())
        raw = torch.load(_dec_path(demo_tree, spk), weights_only=True)
        assert len(raw) == meta["num_utterances"]
        for utt_id, word, logits in zip(meta["utterance_ids"], meta["target_words"], raw):
            j = store.stream(spk, utt_id)  # joined by id, never by position
            assert store.words[j] == word
            assert torch.equal(store.logits(j), logits)
            assert logits.shape[0] == len(tokens.tokenizer.encode_as_ids(word)) + 1
    # gather pads with zero rows and returns [B, S, U, V]
    j = store.stream("F02", meta["utterance_ids"][0].replace("M05", "F02"))
    batch = store.gather(torch.tensor([[j, -1]]), 9)
    U = int(store.lengths[j])
    assert batch.shape == (1, 2, 9, store.vocab_size)
    assert torch.equal(batch[0, 0, :U], store.logits(j))
    assert not batch[0, 0, U:].any() and not batch[0, 1].any()


def test_store_dtype_float16(demo_tree):
    store = LogitStore(demo_tree / "logit_extraction", _tokens(demo_tree), PAIRS[:1], store_dtype=torch.float16)
    assert store.data.dtype == torch.float16
    ref = torch.load(_dec_path(demo_tree, "F02"), weights_only=True)[0]
    assert torch.allclose(store.logits(0), ref, atol=1e-2, rtol=1e-3)


def test_stacked_form_is_read_like_the_list_form(tmp_path):
    # Words of one piece each, so that all U are equal and the stacked [N, U, V] form exists.
    words = {"D1": "ONE", "D2": "TWO", "CW5": "A", "CW19": "I"}
    from local.synthetic import train_tokenizer

    tok = tmp_path / "tok.model"
    train_tokenizer(tok, ["ONE", "TWO", "A", "I"] * 20 + ["ONEA", "TWOI"], 60, seed=1)
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tok))
    words = {k: w for k, w in words.items() if len(sp.encode_as_ids(w)) == 1}
    assert len(words) >= 2
    generate_tree(
        tmp_path / "stacked", speakers=("F02", "M05"), words=words, tokenizer_file=tok, stacked=[("F02", "F02")]
    )
    generate_tree(tmp_path / "list", speakers=("F02", "M05"), words=words, tokenizer_file=tok)
    stacked_file = torch.load(_dec_path(tmp_path / "stacked", "F02"), weights_only=True)
    assert isinstance(stacked_file, torch.Tensor) and stacked_file.dim() == 3
    a, b = _open(tmp_path / "stacked"), _open(tmp_path / "list")
    assert a.utt_ids == b.utt_ids
    assert torch.equal(a.data, b.data)  # same seed: the same logits whatever the form


def test_real_tokenizer_and_metadata_in_both_forms(shared_uaspeech, tmp_path):
    """A tree built from the real SA tokenizer and real metadata (ids, words, order) is read, and
    every U_i equals len(encode_as_ids(word)) + 1 with the real 5000-piece tokenizer."""
    tok = shared_uaspeech / "sa_tokenizer.model"
    sp = load_tokenizer(tok)
    assert sp.vocab_size() == 5000
    meta_dir = tmp_path / "meta"
    meta_dir.mkdir()
    real = json.loads((shared_uaspeech / "metadata" / "M01_metadata.json").read_text())
    shutil.copy(shared_uaspeech / "metadata" / "M01_metadata.json", meta_dir)
    # M04 reduced to its one-piece words, so that its pair can be written in the stacked form.
    m04 = json.loads((shared_uaspeech / "metadata" / "M04_metadata.json").read_text())
    keep = [i for i, w in enumerate(m04["target_words"]) if len(sp.encode_as_ids(w)) == 1]
    for key in ("utterance_ids", "target_words", "ctc_frame_lens", "token_lens"):
        m04[key] = [m04[key][i] for i in keep]
    m04["num_utterances"] = len(keep)
    (meta_dir / "M04_metadata.json").write_text(json.dumps(m04))
    generate_tree(
        tmp_path / "real",
        scale="full",
        speakers=("M01", "M04"),
        tokenizer_file=tok,
        metadata_dir=meta_dir,
        stacked=[("M04", "M04")],
    )
    assert isinstance(torch.load(_dec_path(tmp_path / "real", "M04"), weights_only=True, mmap=True), torch.Tensor)
    store = LogitStore(tmp_path / "real" / "logit_extraction", TokenTable(sp), [("M01", "M01"), ("M04", "M04")])
    assert store.vocab_size == 5000
    assert len(store) == real["num_utterances"] + len(keep)
    for j in range(len(store)):
        assert int(store.lengths[j]) == len(sp.encode_as_ids(store.words[j])) + 1
    assert store.utt_ids[: len(real["utterance_ids"])] == real["utterance_ids"]


def test_real_metadata_files_pass_the_metadata_checks(shared_uaspeech, tmp_path):
    """All 15 real metadata files, with their quirks, pass read_metadata with the real tokenizer."""
    from local.store import read_metadata

    tokens = TokenTable(load_tokenizer(shared_uaspeech / "sa_tokenizer.model"))
    paths = sorted((shared_uaspeech / "metadata").glob("*_metadata.json"))
    assert len(paths) == 15
    for path in paths:
        spk = path.name.split("_")[0]
        (tmp_path / spk / spk).mkdir(parents=True)
        shutil.copy(path, tmp_path / spk / spk / path.name)
        info = read_metadata(tmp_path, spk, spk, tokens)
        meta = json.loads(path.read_text())
        assert info.utt_ids == meta["utterance_ids"]
        assert info.lengths == [len(tokens.tokenizer.encode_as_ids(w)) + 1 for w in meta["target_words"]]
        assert min(info.lengths) >= 2


# ---- every validation error fires, with file, speaker and utterance ------------------------------


def _expect(tree, *fragments, pairs=PAIRS):
    with pytest.raises(LogitStoreError) as err:
        _open(tree, pairs)
    message = str(err.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_missing_speaker_folder(copy_tree):
    tree = copy_tree()
    shutil.rmtree(tree / "logit_extraction" / "M05")
    _expect(tree, "missing folder", "M05")


def test_missing_decoder_file(copy_tree):
    tree = copy_tree()
    _dec_path(tree, "M05").unlink()
    _expect(tree, "missing logit file", "M05_decoder_logits.pt", "speaker M05")


def test_missing_metadata(copy_tree):
    tree = copy_tree()
    _meta_path(tree, "F02").unlink()
    _expect(tree, "missing metadata file", "F02_metadata.json")


def test_count_mismatch(copy_tree):
    tree = copy_tree()
    _edit_logits(tree, "M05", lambda items: items[:-1])
    _expect(tree, "M05_decoder_logits.pt", "utterance_ids", "holds")


def test_metadata_counts_disagree(copy_tree):
    tree = copy_tree()
    _edit_meta(tree, "F02", lambda m: m.update(num_utterances=m["num_utterances"] + 1))
    _expect(tree, "F02_metadata.json", "num_utterances")


def test_duplicate_ids(copy_tree):
    tree = copy_tree()
    meta = _edit_meta(tree, "M05", lambda m: m["utterance_ids"].__setitem__(3, m["utterance_ids"][2]))
    _expect(tree, "duplicate utterance id", meta["utterance_ids"][2])


def test_wrong_tokenizer_length_mismatch(copy_tree):
    tree = copy_tree()
    meta = json.loads(_meta_path(tree, "M05").read_text())
    # Drop the last position of one utterance: U_i no longer equals tokens + 1.
    _edit_logits(tree, "M05", lambda items: [t[:-1] if i == 5 else t for i, t in enumerate(items)])
    _expect(tree, meta["utterance_ids"][5], "wrong tokenizer", "speaker M05")


def test_other_tokenizer_is_refused(copy_tree, tmp_path):
    tree = copy_tree()
    from local.synthetic import train_tokenizer

    train_tokenizer(tree / "tokenizer.model", ["SOMETHING", "ELSE", "ENTIRELY"] * 5, 40, seed=3)
    message = _expect(tree, "F02")
    assert "tokenizer" in message


def test_vocab_differs_between_teachers(copy_tree):
    tree = copy_tree()
    meta = json.loads(_meta_path(tree, "M05").read_text())
    _edit_logits(tree, "M05", lambda items: [t[:, :-1] for t in items])
    _expect(tree, "vocab size", "M05", meta["utterance_ids"][0])


def test_nan_and_inf(copy_tree):
    tree = copy_tree()
    meta = json.loads(_meta_path(tree, "F02").read_text())

    def poison(items):
        items[7][1, 3] = float("nan")
        return items

    _edit_logits(tree, "F02", poison)
    _expect(tree, "NaN or Inf", meta["utterance_ids"][7], "position 1")
    _edit_logits(tree, "F02", lambda items: [t.nan_to_num(0.0) for t in items])
    _open(tree)

    def infinite(items):
        items[2][0, 0] = float("inf")
        return items

    _edit_logits(tree, "F02", infinite)
    _expect(tree, "NaN or Inf", meta["utterance_ids"][2])


def test_unreadable_and_non_tensor_files(copy_tree):
    tree = copy_tree()
    _dec_path(tree, "M05").write_bytes(b"this is not a torch file")
    message = _expect(tree, "is not a tensor file", "refused, for safety", "M05_decoder_logits.pt")
    assert "weights_only=False" not in message  # never suggest the unsafe option
    torch.save({"not": "tensors"}, _dec_path(tree, "M05"))
    _expect(tree, "M05_decoder_logits.pt", "not a list of tensors")
    meta = json.loads(_meta_path(tree, "M05").read_text())
    torch.save(["a"] * meta["num_utterances"], _dec_path(tree, "M05"))
    _expect(tree, "M05_decoder_logits.pt", "expected a float [U, V] tensor", meta["utterance_ids"][0])


class Payload:
    """An arbitrary class: unpickling it would run code of the file's choosing."""


def test_arbitrary_objects_are_never_unpickled(copy_tree):
    tree = copy_tree()
    torch.save([Payload()], _dec_path(tree, "M05"))
    message = _expect(tree, "is not a tensor file", "refused, for safety", "M05_decoder_logits.pt")
    assert "weights_only" not in message and "Payload" not in message


def test_lower_case_words(copy_tree):
    tree = copy_tree()
    meta = _edit_meta(tree, "F02", lambda m: m["target_words"].__setitem__(4, m["target_words"][4].lower()))
    _expect(tree, "lower case", meta["utterance_ids"][4], "F02_metadata.json")


def test_utterance_of_another_speaker(copy_tree):
    tree = copy_tree()
    _edit_meta(tree, "F02", lambda m: m["utterance_ids"].__setitem__(0, m["utterance_ids"][0].replace("F02", "F04")))
    _expect(tree, "belongs to speaker F04")


def test_missing_tokenizer_file(tmp_path):
    with pytest.raises(LogitStoreError, match="does not exist"):
        load_tokenizer(tmp_path / "nope.model")
