#!/usr/bin/env python3
"""Benchmark of the recipe's data path and training step against a naive loader, at the real size.

    python benchmark.py --tree /tmp/uaspeech_full                      # makes the tree if absent
    python benchmark.py --tree /tmp/uaspeech_full --fold_epochs 50     # + 4 folds x 50 epochs, timed
    python benchmark.py --tree /tmp/uaspeech_full --device cuda --precision bf16 --store_dtype float16

The tree is a ``--scale full`` synthetic extraction (15 speakers, vocab 5000, the real per-speaker
utterance counts and token lengths; with the real SA tokenizer and metadata when given). For one
fold (default: M01 held out, ``all_others``, 14 teachers, ``matched`` streams) it measures, each in
a fresh process so that times and peak RSS do not mix:

- floor: reading the fold's decoder ``.pt`` files once (``torch.load`` without mmap, one at a time);
- recipe, cold: ``train.load_fold`` with an empty cache (read, check and pack every file with the
  features the students read, compute the KD targets, write the cache) up to the first batch;
- recipe, warm: the same with the cache of the cold run (what a second run of the fold does), then
  training steps of the default student (``hparams/logit_kd.yaml``), as ``train.py`` takes them;
- recompute: the recipe with ``precompute_features: false`` (its features computed at every step
  from the raw logits, as the recipe did before they were packed);
- naive: the upstream research style: every teacher file loaded whole into a dict, each
  ``[S, U, V]`` item built in ``__getitem__`` by dict look-ups with its KD target, padded in the
  collate function, the student fed raw logits.

Throughput is measured in ``--repeats`` blocks of ``--steps`` steps after ``--warmup_steps``, in
``--rounds`` rounds of fresh processes (warm, recompute, naive, then again), so that a figure is a
median over blocks and processes with its spread (min-max) beside it, and the ratio to the naive
loader is taken within each round (the same machine, the same minutes). Peak RSS is the process's
``ru_maxrss``; "over imports" is its increase over the RSS after the imports.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RECIPE = Path(__file__).resolve().parent
FOLDS = ("M08", "M05", "M16", "M01")


def rss_mib():
    """Current RSS (MiB) from /proc."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def fold_hparams(args, output, precompute=True):
    from local.options import load_fold_hparams

    overrides = (
        f"logit_root: {args.tree}/logit_extraction\ntokenizer_file: {args.tree}/tokenizer.model\n"
        f"output_folder: {output}\ncache_folder: {output}/cache\nstore_dtype: {args.store_dtype}\n"
        f"teacher_set: {args.teacher_set}\ninput_streams: {args.input_streams}\n"
        f"batch_size: {args.batch_size}\nprecompute_features: {str(precompute).lower()}\n"
        # the data path of matched items as written (every teacher speaker's stream of a core id),
        # the items the naive loader builds, not the per-teacher-set choice's
        "matched_choice: false\n"
    )
    return load_fold_hparams(str(RECIPE / "hparams" / f"fold_{args.held_out}.yaml"), overrides)[2]


def recipe_loader(args, output, precompute=True):
    """The recipe's own path (train.load_fold + dataio_prepare + FoldBatch), first batch timed."""
    import torch

    from local.batch import GlobalBatchSampler

    from train import dataio_prepare, load_fold

    hparams = fold_hparams(args, output, precompute)
    start = time.perf_counter()
    fold = load_fold(hparams)
    if args.device != "cpu":  # the packed fold resident on the device (device_resident: true)
        for table in (fold.train_store, fold.targets):
            table.to(args.device)
    datasets, collate = dataio_prepare(fold)
    loader = torch.utils.data.DataLoader(
        datasets["train"],
        batch_sampler=GlobalBatchSampler(len(datasets["train"]), args.batch_size, 1),
        collate_fn=collate["train"],
    )
    first = next(iter(loader))
    info = {"cache": "warm" if fold.train_store.from_cache else "cold", "items": len(datasets["train"])}
    return start, first, endless(loader), hparams, fold.train_store.vocab_size, info


def endless(loader):
    """Batches of the loader, epoch after epoch."""
    epoch = 0
    while True:
        if hasattr(loader.batch_sampler, "set_epoch"):
            loader.batch_sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


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

    from local.corpus import SPEAKERS

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
        streams=logits,
        targets=targets,
        tokens=tokens,
        stream_mask=stream_mask,
        stream_ids=torch.where(stream_mask, torch.arange(S)[None] % len(SPEAKERS), -1),
        pos_mask=pos_mask,
        lengths=lengths,
        rows=(0, B, B),
        global_positions=float(lengths.sum()),
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
    first = next(iter(loader))
    return start, first, endless(loader), hparams, tokens.vocab_size, {"items": len(items)}


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


def throughput(args, first, batches, hparams, vocab_size):
    """Training steps of the default student, as ``train.py`` takes them (stream subsets and dropout
    from the step's noise, KD + CE loss, Adam), in ``repeats`` timed blocks; then the data path
    alone (the same number of batches, gathered and not trained on)."""
    import torch

    from local.batch import FoldBatch, StepNoise
    from local.corpus import SPEAKERS
    from local.fusion import drop_streams
    from local.kd import kd_loss

    device = torch.device(args.device)
    torch.manual_seed(1)
    student = hparams["student"](vocab_size=vocab_size, n_identities=len(SPEAKERS)).to(device)
    opt = hparams["opt_class"](student.parameters())
    autocast = args.precision != "fp32"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
    scaler = torch.amp.GradScaler(device.type) if args.precision == "fp16" else None

    def step(batch, n):
        if isinstance(batch, FoldBatch):
            batch = batch.to(device)
        else:  # the naive batch: every tensor crosses to the device
            for name in ("logits", "targets", "tokens", "stream_mask", "stream_ids", "pos_mask"):
                setattr(batch, name, getattr(batch, name).to(device))
            batch.streams = batch.logits
        noise = StepNoise(n, batch.rows, device)
        with torch.autocast(device.type, dtype=dtype, enabled=autocast):
            mask = drop_streams(batch.stream_mask, hparams["stream_dropout"], noise=noise)
            out = student(batch.streams, mask, batch.stream_ids, noise=noise)
        loss, _, _ = kd_loss(
            out.float(),
            batch.targets,
            batch.tokens,
            batch.pos_mask,
            hparams["temperature"],
            hparams["alpha"],
            positions=batch.global_positions,
        )
        opt.zero_grad()
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        return int(batch.stream_mask.sum()), batch.stream_mask.shape[0]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    n = 0
    step(first, n)
    for _ in range(args.warmup_steps):
        n += 1
        step(next(batches), n)
    blocks = []
    for _ in range(args.repeats):
        sync()
        streams = items = 0
        start = time.perf_counter()
        for _ in range(args.steps):
            n += 1
            s, b = step(next(batches), n)
            streams, items = streams + s, items + b
        sync()
        seconds = time.perf_counter() - start
        blocks.append({"streams_per_s": streams / seconds, "items_per_s": items / seconds})
    loaded = 0
    start = time.perf_counter()
    for _ in range(args.steps):
        loaded += int(next(batches).stream_mask.sum())
    sync()
    return {"blocks": blocks, "loader_streams_per_s": loaded / (time.perf_counter() - start)}


def worker(args):
    """One measurement in this process; prints one JSON line."""
    import speechbrain  # noqa: F401
    import torch

    import train  # noqa: F401

    torch.set_num_threads(args.threads)
    base = rss_mib()
    output = Path(args.work) / "out"
    if args.worker == "floor":
        result = floor(args, output)
    else:
        if args.worker == "naive":
            loaded = naive_loader(args, output)
        else:
            loaded = recipe_loader(args, output, precompute=args.worker != "recompute")
        start, first, batches, hparams, vocab, info = loaded
        result = {"first_batch_s": time.perf_counter() - start, **info}
        result["peak_rss_before_training_mib"] = peak_rss_mib()
        if args.steps:
            result.update(throughput(args, first, batches, hparams, vocab))
    result.update(base_rss_mib=base, peak_rss_mib=peak_rss_mib(), loaded_rss_mib=peak_rss_mib() - base)
    if args.device.startswith("cuda"):
        result["device_name"] = torch.cuda.get_device_name()
        result["peak_device_mib"] = torch.cuda.max_memory_allocated() / 2**20
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
    cmd = [sys.executable, __file__, "--worker", kind, "--work", str(work)]
    for name in ("tree", "held_out", "teacher_set", "input_streams", "store_dtype", "batch_size", "device"):
        cmd += [f"--{name}", str(getattr(args, name))]
    cmd += ["--precision", args.precision, "--threads", str(args.threads), "--repeats", str(args.repeats)]
    cmd += ["--steps", str(0 if kind in ("floor", "cold") else args.steps), "--warmup_steps", str(args.warmup_steps)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"benchmark worker {kind} failed:\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def train_folds(args, work, written=False):
    """Wall time of ``train.py`` on the evaluation folds (``--folds``), ``--fold_epochs`` epochs each
    (the default student, with the options chosen per teacher set; ``written``: with the options as
    written, ``--matched_choice=false``). The packed cache of a fold's teachers is made beforehand by
    a 1-epoch run, so that both timings are of training and testing alone."""
    times = {}
    label = "as written" if written else "defaults"
    for fold in args.folds:
        cmd = [
            sys.executable,
            str(RECIPE / "train.py"),
            str(RECIPE / "hparams" / f"fold_{fold}.yaml"),
            f"--logit_root={args.tree}/logit_extraction",
            f"--tokenizer_file={args.tree}/tokenizer.model",
            f"--cache_folder={work}/folds/cache",
            f"--threads={args.threads}",
            f"--store_dtype={args.store_dtype}",
            f"--device={args.device}",
            "--noprogressbar",
        ]
        if written:
            cmd.append("--matched_choice=false")
        if args.device != "cpu":
            cmd += ["--device_resident=true", f"--precision={args.precision}"]
        name = f"{fold}_{'written' if written else 'defaults'}"
        fill = [*cmd, f"--output_folder={work}/folds/fill_{name}", "--number_of_epochs=1"]
        timed = [*cmd, f"--output_folder={work}/folds/{name}", f"--number_of_epochs={args.fold_epochs}"]
        for command, record in ((fill, False), (timed, True)):
            start = time.perf_counter()
            proc = subprocess.run(command, cwd=RECIPE, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"train.py on fold {fold} ({label}) failed:\n{proc.stderr[-4000:]}")
            if record:
                times[fold] = time.perf_counter() - start
        print(f"  fold {fold} ({label}): {times[fold]:.0f} s", flush=True)
    return times


def spread(values, fmt="{:.0f}"):
    """'median [min-max]' of values."""
    return f"{fmt.format(statistics.median(values))} [{fmt.format(min(values))}-{fmt.format(max(values))}]"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", help="full-scale tree (made with the demo generator if absent)")
    parser.add_argument("--tokenizer_file", help="when making the tree: the real SA tokenizer")
    parser.add_argument("--metadata_dir", help="when making the tree: the real <SPK>_metadata.json files")
    parser.add_argument("--held_out", default="M01")
    parser.add_argument("--teacher_set", default="all_others")
    parser.add_argument("--input_streams", default="matched", choices=("self", "matched"))
    parser.add_argument("--store_dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=25, help="training steps per timed block")
    parser.add_argument("--repeats", type=int, default=4, help="timed blocks per process")
    parser.add_argument("--rounds", type=int, default=2, help="fresh processes per loader")
    parser.add_argument("--warmup_steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: every core)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"), help="autocast on a GPU")
    parser.add_argument("--fold_epochs", type=int, default=0, help="also time train.py on the folds (0: no)")
    parser.add_argument(
        "--folds", nargs="+", default=list(FOLDS), choices=FOLDS, help="the folds --fold_epochs times (default: all 4)"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    decode = parser.add_argument_group("--decode: decode.py against SpeechBrain's searcher (local/decode_benchmark.py)")
    decode.add_argument("--decode", action="store_true", help="run the decode benchmark (no --tree needed)")
    decode.add_argument("--utterances", type=int, default=16, help="utterances decoded per measurement")
    decode.add_argument("--beam_size", type=int, default=66, help="beam (the SA test search: 66)")
    decode.add_argument("--streams", type=int, default=14, help="the student's test streams (S)")
    decode.add_argument("--d_model", type=int, help="SA model size (default: the SA models', 144)")
    decode.add_argument("--encoder_layers", type=int, help="conformer encoder layers (default 12)")
    decode.add_argument("--decoder_layers", type=int, help="transformer decoder layers (default 4)")
    decode.add_argument("--d_ffn", type=int, help="feed-forward size (default 1024)")
    decode.add_argument("--lm_d_model", type=int, help="LM size (default: the SA LM, 768)")
    decode.add_argument("--lm_layers", type=int, help="LM layers (default: the SA LM, 12)")
    decode.add_argument("--eos_bias", type=float, default=2.5, help="added to the random decoder's </s> output")
    decode.add_argument("--blank_bias", type=float, default=10.0, help="added to the random CTC layer's blank output")
    decode.add_argument("--memory_frames", type=int, default=75, help="encoder frames of the memory table (3 s)")
    decode.add_argument("--ctc_scoring", default="full", choices=("full", "partial"), help="of decode.py's searches")
    decode.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.decode:
        return decode_benchmark(args)
    if args.tree is None:
        sys.exit("ERROR: --tree is required (or --decode)")
    if args.precision != "fp32" and args.device == "cpu":
        sys.exit("ERROR: --precision bf16/fp16 is for a GPU (--device cuda)")

    tree = Path(args.tree)
    if not (tree / "SYNTHETIC.json").is_file():
        from local.synthetic import generate_tree

        print(f"making a full-scale synthetic tree in {tree} ...", flush=True)
        t = time.perf_counter()
        generate_tree(tree, scale="full", tokenizer_file=args.tokenizer_file, metadata_dir=args.metadata_dir)
        print(f"  done in {time.perf_counter() - t:.0f} s", flush=True)
    nbytes, n_teachers = fold_bytes(args)
    results = {"rounds": []}
    with tempfile.TemporaryDirectory() as work:
        results["floor"] = run("floor", args, work)
        results["cold"] = run("cold", args, work)
        for r in range(args.rounds):
            print(f"round {r + 1} of {args.rounds} ...", flush=True)
            results["rounds"].append({kind: run(kind, args, work) for kind in ("warm", "recompute", "naive")})
        if args.fold_epochs:
            print(f"train.py, {len(args.folds)} folds x {args.fold_epochs} epochs ...", flush=True)
            results["folds"] = train_folds(args, work)
            results["folds_written"] = train_folds(args, work, written=True)
    report(args, results, nbytes, n_teachers)


def decode_benchmark(args):
    from local import decode_benchmark

    if args.precision == "fp16" and args.device == "cpu":
        sys.exit("ERROR: --precision fp16 is for a GPU (--device cuda)")
    if args.threads == os.cpu_count() and args.device == "cpu":
        args.threads = 1  # CPU seconds of one thread: what other load on the machine does not change
    args.describe_model = (
        f"{args.encoder_layers or 12} conformer encoder layers, {args.decoder_layers or 4} decoder layers, "
        f"d_model {args.d_model or 144}, d_ffn {args.d_ffn or 1024}, vocab 5000"
    )
    with tempfile.TemporaryDirectory() as work:
        args.work = work
        decode_benchmark.run(args)


def report(args, results, nbytes, n_teachers):
    rounds = results["rounds"]
    blocks = {k: [b["streams_per_s"] for r in rounds for b in r[k]["blocks"]] for k in ("warm", "recompute", "naive")}
    ratios = {
        k: [statistics.median(b["streams_per_s"] for b in r[k]["blocks"]) for r in rounds]
        for k in ("warm", "recompute", "naive")
    }
    cold, floor_s = results["cold"], results["floor"]["seconds"]
    warm = rounds[0]["warm"]
    device = rounds[0]["warm"].get("device_name", f"CPU, {args.threads} threads")
    print(
        f"\nfold {args.held_out} ({args.teacher_set}: {n_teachers} teachers, {args.input_streams} streams), "
        f"store_dtype {args.store_dtype}, batch {args.batch_size}, device {args.device} ({device}), "
        f"precision {args.precision}"
    )
    print(
        f"fold decoder logits (float32): {nbytes / 2**30:.2f} GiB; floor (torch.load of the fold's files): "
        f"{floor_s:.1f} s"
    )
    print(
        f"throughput: median [min-max] over {args.rounds} processes x {args.repeats} blocks of {args.steps} "
        f"steps, after {args.warmup_steps} warm-up steps"
    )
    rows = [("", "recipe", "recompute", "naive")]
    rows.append(
        (
            "time to first batch (s)",
            f"{cold['first_batch_s']:.1f} cold, {warm['first_batch_s']:.1f} warm",
            spread([r["recompute"]["first_batch_s"] for r in rounds], "{:.1f}"),
            spread([r["naive"]["first_batch_s"] for r in rounds], "{:.1f}"),
        )
    )
    rows.append(
        (
            "peak RSS over imports (GiB)",
            f"{cold['loaded_rss_mib'] / 1024:.2f} cold, {warm['loaded_rss_mib'] / 1024:.2f} warm",
            f"{rounds[0]['recompute']['loaded_rss_mib'] / 1024:.2f}",
            f"{rounds[0]['naive']['loaded_rss_mib'] / 1024:.2f}",
        )
    )
    rows.append(("training streams/s", *(spread(blocks[k]) for k in ("warm", "recompute", "naive"))))
    rows.append(
        (
            "data path alone, streams/s",
            *(spread([r[k]["loader_streams_per_s"] for r in rounds]) for k in ("warm", "recompute", "naive")),
        )
    )
    width = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(f"{c:<{width[i]}}" if i == 0 else f"{c:>{width[i]}}" for i, c in enumerate(r)))
    train_ratio = [w / n for w, n in zip(ratios["warm"], ratios["naive"])]
    recompute_ratio = [w / n for w, n in zip(ratios["warm"], ratios["recompute"])]
    limit_rss = 0.7 if args.store_dtype != "float32" else 1.3
    rss_ratio = cold["loaded_rss_mib"] * 2**20 / nbytes
    checks = [
        ("first batch, cold, / floor", [cold["first_batch_s"] / floor_s], 1.5, "<="),
        (f"peak RSS over imports / fold bytes (cold, {args.store_dtype})", [rss_ratio], limit_rss, "<="),
        ("training throughput / naive (per round)", train_ratio, 5.0, ">="),
        ("training throughput / recompute (per round)", recompute_ratio, None, None),
    ]
    if "folds" in results:
        minutes = sum(results["folds"].values()) / 60
        target = 15.0 if args.device == "cpu" else 2.0
        if len(args.folds) == len(FOLDS):  # the target is the four folds'
            checks.append((f"{len(FOLDS)} folds x {args.fold_epochs} epochs (minutes)", [minutes], target, "<="))
        else:
            checks.append(
                (f"folds {' '.join(args.folds)} x {args.fold_epochs} epochs (minutes)", [minutes], None, None)
            )
    if "folds_written" in results:
        # The options chosen per teacher set may cost a fold at most twice the time of the options
        # as written (each fold's ratio; the slowest is the check)
        growth = [results["folds"][f] / results["folds_written"][f] for f in args.folds]
        checks.append(("a fold's time, defaults / options as written (each fold)", growth, 2.0, "<="))
    print()
    for name, values, target, op in checks:
        shown = spread(values, "{:.2f}") if len(values) > 1 else f"{values[0]:.2f}"
        if target is None:
            print(f"{name:<55} {shown:>20}")
            continue
        ok = all(v <= target for v in values) if op == "<=" else all(v >= target for v in values)
        print(f"{name:<55} {shown:>20}  {'met' if ok else 'NOT met'} (target {op} {target})")
    print("\nJSON " + json.dumps({"fold_bytes": nbytes, "args": vars(args), "results": results}))


if __name__ == "__main__":
    main()
