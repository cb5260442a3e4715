"""The synthetic demo tree: deterministic, in the exact on-disk format, pairs addable later."""

import json

import torch

from local.layout import METADATA_KEYS
from local.store import LogitStore, TokenTable, load_tokenizer
from local.synthetic import add_pairs, ensure_demo_tree, generate_tree


def test_same_seed_same_tree_and_added_pairs_equal_generated_ones(tmp_path):
    speakers = ("F02", "M07")
    generate_tree(tmp_path / "a", speakers=speakers, pairs=[("F02", "F02"), ("M07", "M07"), ("M07", "F02")])
    generate_tree(tmp_path / "b", speakers=speakers)
    add_pairs(tmp_path / "b", [("M07", "F02")])
    for pair in ("F02/F02", "M07/F02"):
        spk = pair[-3:]
        for name in (f"{spk}_metadata.json",):
            assert (tmp_path / "a" / "logit_extraction" / pair / name).read_text() == (
                tmp_path / "b" / "logit_extraction" / pair / name
            ).read_text()
        a = torch.load(tmp_path / "a" / "logit_extraction" / pair / f"{spk}_decoder_logits.pt", weights_only=True)
        b = torch.load(tmp_path / "b" / "logit_extraction" / pair / f"{spk}_decoder_logits.pt", weights_only=True)
        assert all(torch.equal(x, y) for x, y in zip(a, b)) and len(a) == len(b)
    assert (tmp_path / "a" / "tokenizer.model").read_bytes() == (tmp_path / "b" / "tokenizer.model").read_bytes()
    summary = json.loads((tmp_path / "b" / "SYNTHETIC.json").read_text())
    assert ["M07", "F02"] in summary["pairs"] and summary["synthetic"] is True


def test_demo_tree_format_and_accuracy_order(demo_tree):
    meta = json.loads((demo_tree / "logit_extraction" / "M01" / "M01" / "M01_metadata.json").read_text())
    assert list(meta) == list(METADATA_KEYS)  # the real files' keys, in their order
    assert all(lens == [1.0] for lens in meta["token_lens"])
    assert meta["ctc_frame_lens"] == sorted(meta["ctc_frame_lens"])  # ascending duration, like the real files
    assert {u.rsplit("_", 1)[1] for u in meta["utterance_ids"]} == {"M5", "M6", "M7"}
    # CTC files exist for the held-out speakers' pairs, with the metadata's frame counts
    ctc = torch.load(demo_tree / "logit_extraction" / "M01" / "M01" / "M01_ctc_logits.pt", weights_only=True)
    assert [t.shape[0] for t in ctc] == meta["ctc_frame_lens"]
    assert not (demo_tree / "logit_extraction" / "F02" / "F02" / "F02_ctc_logits.pt").exists()
    # speaker accuracy follows intelligibility: the top-1 token accuracy of F05 (95 %) > M04 (2 %)
    tokens = TokenTable(load_tokenizer(demo_tree / "tokenizer.model"))
    store = LogitStore(demo_tree / "logit_extraction", tokens, [("F05", "F05"), ("M04", "M04")])
    acc = {}
    for spk in ("F05", "M04"):
        hits = total = 0
        for j in store.pair_streams[(spk, spk)]:
            ref = torch.tensor(tokens.tokens_eos(store.words[j]))
            hits += int((store.logits(j).argmax(-1) == ref).sum())
            total += len(ref)
        acc[spk] = hits / total
    assert acc["F05"] > acc["M04"] + 0.2


def test_ensure_demo_tree_reuses_and_extends(tmp_path):
    folder = tmp_path / "demo"
    _, _, made = ensure_demo_tree(folder)
    assert made
    stamp = (folder / "logit_extraction" / "F02" / "F02" / "F02_decoder_logits.pt").stat().st_mtime_ns
    _, _, made = ensure_demo_tree(folder)
    assert not made
    _, _, made = ensure_demo_tree(folder, pairs=[("F02", "M08")])
    assert made and (folder / "logit_extraction" / "F02" / "M08" / "M08_ctc_logits.pt").is_file()
    assert (folder / "logit_extraction" / "F02" / "F02" / "F02_decoder_logits.pt").stat().st_mtime_ns == stamp
