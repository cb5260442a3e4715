#!/usr/bin/env python3
"""Benchmark of the recipe's data path against a naive loader, at the real corpus size.

    python benchmark.py --tree /tmp/uaspeech_full                      # makes the tree if absent
    python benchmark.py --tree /tmp/uaspeech_full --tokenizer_file sa_tokenizer.model \
        --metadata_dir uaspeech/metadata --store_dtype float16 --device cuda

The tree is a ``--scale full`` synthetic extraction (15 speakers, vocab 5000, the real per-speaker
utterance counts and token lengths; with the real SA tokenizer and metadata when given). For one
fold (default: M01 held out, ``all_others``, 14 teachers, ``matched`` streams) it measures, each in
a fresh process so that times and peak RSS do not mix:

- floor: reading the fold's decoder ``.pt`` files once (``torch.load`` without mmap, one at a time);
- recipe, cold: ``train.load_fold`` with an empty cache (read, check and pack every file, compute
  the KD targets, write the cache) up to the first batch;
- recipe, warm: the same with the cache of the cold run (what a second run of the fold does);
- naive: the upstream research style: every teacher file loaded whole into a dict, each
  ``[S, U, V]`` item built in ``__getitem__`` by dict look-ups with its KD target, padded in the
  collate function;
- training throughput of the ``transformer`` student fed by each loader (utterance streams/s and
  items/s, after warm-up steps), and the data path alone (the same batches, not trained on).

Peak RSS is the process's ``ru_maxrss``; "loaded" is its increase over the RSS after imports.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RECIPE = Path(__file__).resolve().parent


def rss_mib():
    """Current RSS (MiB) from /proc."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def fold_hparams(args, output):
    from local.options import load_fold_hparams

    overrides = (
        f"logit_root: {args.tree}/logit_extraction\ntokenizer_file: {args.tree}/tokenizer.model\n"
        f"output_folder: {output}\ncache_folder: {output}/cache\nstore_dtype: {args.store_dtype}\n"
        f"teacher_set: {args.teacher_set}\ninput_streams: {args.input_streams}\n"
        f"batch_size: {args.batch_size}\n"
    )
    return load_fold_hparams(str(RECIPE / "hparams" / f"fold_{args.held_out}.yaml"), overrides)[2]


def recipe_loader(args, output):
    """The recipe's own path (train.load_fold + dataio_prepare + FoldBatch), first batch timed."""
    import torch
    from speechbrain.dataio.sampler import ReproducibleRandomSampler

    from train import dataio_prepare, load_fold

    hparams = fold_hparams(args, output)
    start = time.perf_counter()
    fold = load_fold(hparams)
    datasets, collate = dataio_prepare(fold)
    loader = torch.utils.data.DataLoader(
        datasets["train"],
        batch_size=args.batch_size,
        collate_fn=collate["train"],
        sampler=ReproducibleRandomSampler(datasets["train"], seed=1),
    )
    batches = iter(loader)
    first = next(batches)
    return (
        start,
        first,
        batches,
        fold.train_store.vocab_size,
        {"cache": "warm" if fold.train_store.from_cache else "cold", "items": len(datasets["train"])},
    )


class NaiveDataset:
    """Upstream style: files loaded whole, items assembled by dict look-ups in __getitem__."""

    def __init__(self, fold_items, logits, words, tokens, temperature):
        self.items, self.logits, self.words, self.tokens, self.T = fold_items, logits, words, tokens, temperature

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        import torch

        keys = self.items[i]
        stack = torch.stack([self.logits[k] for k in keys])  # [S, U, V]
        target = torch.softmax(stack / self.T, -1).mean(0)  # KD target, every time
        return stack, target, torch.tensor(self.tokens.tokens_eos(self.words[keys[0]]))


def naive_collate(examples):
    from types import SimpleNamespace

    import torch

    B = len(examples)
    S = max(e[0].shape[0] for e in examples)
    U = max(e[0].shape[1] for e in examples)
    V = examples[0][0].shape[2]
    logits, targets = torch.zeros(B, S, U, V), torch.zeros(B, U, V)
    tokens = torch.zeros(B, U, dtype=torch.long)
    stream_mask = torch.zeros(B, S, dtype=torch.bool)
    lengths = torch.zeros(B, dtype=torch.long)
    for b, (stack, target, tok) in enumerate(examples):
        s, u = stack.shape[:2]
        logits[b, :s, :u], targets[b, :u], tokens[b, :u] = stack, target, tok
        stream_mask[b, :s], lengths[b] = True, u
    pos_mask = torch.arange(U)[None] < lengths[:, None]
    return SimpleNamespace(
        logits=logits,
        targets=targets,
        tokens=tokens,
        stream_mask=stream_mask,
        stream_ids=torch.zeros(B, S, dtype=torch.long),
        pos_mask=pos_mask,
        lengths=lengths,
    )


def naive_loader(args, output):
    import torch

    from local.corpus import core_id
    from local.folds import store_pairs, teacher_speakers
    from local.store import TokenTable, load_tokenizer

    hparams = fold_hparams(args, output)
    start = time.perf_counter()
    tokens = TokenTable(load_tokenizer(hparams["tokenizer_file"]))
    teachers = teacher_speakers(hparams["held_out"], hparams["teacher_set"])
    pairs, _ = store_pairs(hparams["held_out"], teachers, "matched")
    logits, words, by_core = {}, {}, {}
    for model, spk in pairs:
        folder = Path(hparams["logit_root"]) / model / spk
        meta = json.loads((folder / f"{spk}_metadata.json").read_text())
        data = torch.load(folder / f"{spk}_decoder_logits.pt", weights_only=True)
        for utt_id, word, z in zip(meta["utterance_ids"], meta["target_words"], data):
            logits[(model, utt_id)] = z
            words[(model, utt_id)] = word
            by_core.setdefault(core_id(utt_id), []).append((model, utt_id))
    items = list(by_core.values())
    dataset = NaiveDataset(items, logits, words, tokens, hparams["temperature"])
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, collate_fn=naive_collate)
    batches = iter(loader)
    first = next(batches)
    return start, first, batches, tokens.vocab_size, {"items": len(items)}


def floor(args, output):
    import torch

    from local.folds import store_pairs, teacher_speakers

    hparams = fold_hparams(args, output)
    start = time.perf_counter()
    teachers = teacher_speakers(hparams["held_out"], hparams["teacher_set"])
    train_pairs, test_pairs = store_pairs(hparams["held_out"], teachers, "matched")
    loaded = 0
    for model, spk in train_pairs + test_pairs:  # torch.load without mmap reads every byte
        data = torch.load(Path(hparams["logit_root"]) / model / spk / f"{spk}_decoder_logits.pt", weights_only=True)
        loaded += len(data)
        del data
    return {"seconds": time.perf_counter() - start, "utterances": loaded}


def throughput(args, first, batches, vocab_size):
    """Training steps of the default transformer student on batches from the loader."""
    import torch

    from local.fusion import FusionStudent
    from local.kd import kd_loss

    device = torch.device(args.device)
    student = FusionStudent("transformer", vocab_size, 15).to(device)
    opt = torch.optim.Adam(student.parameters(), lr=1e-3)

    def step(batch):
        logits = batch.logits.to(device)
        out = student(logits, batch.stream_mask.to(device), batch.stream_ids.to(device))
        loss, _, _ = kd_loss(
            out, batch.targets.to(device), batch.tokens.to(device), batch.pos_mask.to(device), 3.0, 0.7
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        return int(batch.stream_mask.sum()), logits.shape[0]

    step(first)
    for _ in range(args.warmup_steps):
        step(next(batches))
    if device.type == "cuda":
        torch.cuda.synchronize()
    streams = items = 0
    start = time.perf_counter()
    for _ in range(args.steps):
        s, b = step(next(batches))
        streams, items = streams + s, items + b
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    # The data path alone: the same number of batches, gathered and not trained on.
    loaded = 0
    start = time.perf_counter()
    for _ in range(args.steps):
        loaded += int(next(batches).stream_mask.sum())
    loader_seconds = time.perf_counter() - start
    return {
        "streams_per_s": streams / seconds,
        "items_per_s": items / seconds,
        "loader_streams_per_s": loaded / loader_seconds,
    }


def worker(args):
    """One measurement in this process; prints one JSON line."""
    import speechbrain  # noqa: F401
    import torch  # noqa: F401  (imports before the baseline RSS)

    import train  # noqa: F401

    base = rss_mib()
    output = Path(args.work) / "out"
    if args.worker == "floor":
        result = floor(args, output)
    else:
        load = recipe_loader if args.worker in ("cold", "warm") else naive_loader
        start, first, batches, vocab, info = load(args, output)
        result = {"first_batch_s": time.perf_counter() - start, **info}
        result["peak_rss_before_training_mib"] = peak_rss_mib()
        if args.steps:
            result.update(throughput(args, first, batches, vocab))
    result.update(base_rss_mib=base, peak_rss_mib=peak_rss_mib(), loaded_rss_mib=peak_rss_mib() - base)
    print("RESULT " + json.dumps(result))


def fold_bytes(args):
    """Float32 bytes of the fold's decoder logits (teachers and held-out speaker), from metadata."""
    from local.folds import store_pairs, teacher_speakers
    from local.store import TokenTable, load_tokenizer, read_metadata

    tokens = TokenTable(load_tokenizer(Path(args.tree) / "tokenizer.model"))
    teachers = teacher_speakers(args.held_out, args.teacher_set)
    train_pairs, test_pairs = store_pairs(args.held_out, teachers, args.input_streams)
    positions = sum(
        sum(read_metadata(Path(args.tree) / "logit_extraction", m, s, tokens).lengths)
        for m, s in train_pairs + test_pairs
    )
    return positions * tokens.vocab_size * 4, len(train_pairs)


def run(kind, args, work):
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        kind,
        "--work",
        str(work),
        "--tree",
        str(args.tree),
        "--held_out",
        args.held_out,
        "--teacher_set",
        args.teacher_set,
        "--input_streams",
        args.input_streams,
        "--store_dtype",
        args.store_dtype,
        "--batch_size",
        str(args.batch_size),
        "--device",
        args.device,
        "--steps",
        str(0 if kind == "floor" else args.steps),
        "--warmup_steps",
        str(args.warmup_steps),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"benchmark worker {kind} failed:\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", required=True, help="full-scale tree (made with the demo generator if absent)")
    parser.add_argument("--tokenizer_file", help="when making the tree: the real SA tokenizer")
    parser.add_argument("--metadata_dir", help="when making the tree: the real <SPK>_metadata.json files")
    parser.add_argument("--held_out", default="M01")
    parser.add_argument("--teacher_set", default="all_others")
    parser.add_argument("--input_streams", default="matched", choices=("self", "matched"))
    parser.add_argument("--store_dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30, help="timed training steps per loader")
    parser.add_argument("--warmup_steps", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    tree = Path(args.tree)
    if not (tree / "SYNTHETIC.json").is_file():
        from local.synthetic import generate_tree

        print(f"making a full-scale synthetic tree in {tree} ...", flush=True)
        t = time.perf_counter()
        generate_tree(tree, scale="full", tokenizer_file=args.tokenizer_file, metadata_dir=args.metadata_dir)
        print(f"  done in {time.perf_counter() - t:.0f} s", flush=True)
    nbytes, n_teachers = fold_bytes(args)
    with tempfile.TemporaryDirectory() as work:
        results = {"floor": run("floor", args, work)}
        results["cold"] = run("cold", args, work)
        results["warm"] = run("warm", args, work)
        results["naive"] = run("naive", args, work)
    gib = nbytes / 2**30
    print(
        f"\nfold {args.held_out} ({args.teacher_set}: {n_teachers} teachers, {args.input_streams} streams), "
        f"store_dtype {args.store_dtype}, batch {args.batch_size}, device {args.device}"
    )
    print(
        f"fold decoder logits (float32): {gib:.2f} GiB; floor (torch.load of the fold's files): "
        f"{results['floor']['seconds']:.1f} s"
    )
    rows = [("", "recipe cold", "recipe warm", "naive")]
    cold, warm, naive = results["cold"], results["warm"], results["naive"]
    rows.append(("time to first batch (s)", *(f"{r['first_batch_s']:.2f}" for r in (cold, warm, naive))))
    rows.append(("peak RSS (GiB)", *(f"{r['peak_rss_mib'] / 1024:.2f}" for r in (cold, warm, naive))))
    rows.append(("peak RSS over imports (GiB)", *(f"{r['loaded_rss_mib'] / 1024:.2f}" for r in (cold, warm, naive))))
    rows.append(("training streams/s", *(f"{r['streams_per_s']:.0f}" for r in (cold, warm, naive))))
    rows.append(("training items/s", *(f"{r['items_per_s']:.1f}" for r in (cold, warm, naive))))
    rows.append(("data path alone, streams/s", *(f"{r['loader_streams_per_s']:.0f}" for r in (cold, warm, naive))))
    width = max(len(r[0]) for r in rows)
    for r in rows:
        print(f"{r[0]:<{width}}  " + "  ".join(f"{c:>12}" for c in r[1:]))
    fl = results["floor"]["seconds"]
    limit_rss = 0.7 if args.store_dtype != "float32" else 1.3
    checks = [
        ("first batch cold <= 1.5x floor", cold["first_batch_s"] / fl, 1.5),
        ("warm start < 3 s", warm["first_batch_s"], 3.0),
        (f"peak RSS <= {limit_rss}x fold bytes (whole process)", cold["peak_rss_mib"] * 2**20 / nbytes, limit_rss),
        (f"peak RSS <= {limit_rss}x fold bytes (over imports)", cold["loaded_rss_mib"] * 2**20 / nbytes, limit_rss),
        ("training throughput >= 5x naive", warm["streams_per_s"] / naive["streams_per_s"], 5.0),
        ("data path alone >= 5x naive", warm["loader_streams_per_s"] / naive["loader_streams_per_s"], 5.0),
    ]
    print()
    for name, value, target in checks:
        ok = value >= target if "naive" in name else value <= target
        print(f"{name:<50} {value:8.2f}  {'met' if ok else 'NOT met'} (target {target})")
    print("\nJSON " + json.dumps({"fold_bytes": nbytes, "results": results}))


if __name__ == "__main__":
    main()
