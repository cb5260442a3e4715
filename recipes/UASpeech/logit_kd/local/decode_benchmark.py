"""The decode benchmark (``benchmark.py --decode``): decode.py's batched search against
SpeechBrain's own ``S2STransformerBeamSearcher`` on models of the SA architecture.

Models: ``hparams/sa_model_benchmark.yaml`` (the SA models' architecture and test search), random
weights, written as SA experiment folders (``hyperparams.yaml``, ``save/CKPT+*/model.ckpt``,
``normalizer.ckpt``, ``save/lm.ckpt``) and loaded by ``SAModel`` as decode.py loads them. Random
weights never end a hypothesis, so the decoder's ``</s>`` output and the CTC layer's blank output
are raised (``--eos_bias``, ``--blank_bias``): the searches then end after a few pieces, as a
trained model's do on a word (the lengths are printed). Audio: noise of the lengths of UASpeech
words (uniform in 1-3 s, or drawn from the real metadata's encoder frames).

Measured, each on the same utterances in the same process, alternated over ``--rounds``:

- S = 1: decode.py's search (``decode_batch``: ``SAModel.encode_batch`` and the recipe's searcher
  around the model alone) against SpeechBrain's own, as the SA pipeline builds it
  (``S2STransformerBeamSearcher`` on the model's ``Transformer`` and ``seq_lin``, its
  ``CTCScorer`` and ``TransformerLMScorer``, the encoder run on SpeechBrain's padded batch), at
  the same batch size and settings (target: ratio >= 0.9);
- S streams against 1: the fold's student (the default transformer fusion, random weights) on
  ``--streams`` models (their encoders, decoders and the mean of their CTC) against the same
  student on one (target: <= S x);
- batched against one utterance at a time (decode.py's search): the speed-up.

Times are CPU seconds of the process (``time.process_time``) on a CPU, so that the load of other
work on a shared machine does not enter them, and wall seconds on a GPU (synchronised).
"""

import json
import statistics
import time
from pathlib import Path

import torch

RECIPE = Path(__file__).resolve().parents[1]
YAML = RECIPE / "hparams" / "sa_model_benchmark.yaml"


def write_model(folder, seed, sizes, eos_bias, blank_bias):
    """An SA experiment folder with random weights; returns (hparams file, save folder)."""
    from hyperpyyaml import load_hyperpyyaml, resolve_references
    from speechbrain.utils.checkpoints import Checkpointer

    folder = Path(folder)
    overrides = {"seed": seed, **sizes}
    text = YAML.read_text(encoding="utf-8")
    hp = load_hyperpyyaml(text, overrides)
    with torch.no_grad():
        hp["seq_lin"].w.bias[hp["eos_index"]] += eos_bias
        hp["ctc_lin"].w.bias[hp["blank_index"]] += blank_bias
    norm = hp["normalize"]
    norm.train()
    generator = torch.Generator().manual_seed(seed)
    norm(2.0 * torch.randn(4, 50, hp["n_mels"], generator=generator) + 1.0, torch.ones(4))
    norm.eval()
    save = folder / "save"
    Checkpointer(save, recoverables={"model": hp["model"], "normalizer": norm}).save_checkpoint(meta={"WRA": 0.5})
    torch.save(hp["lm_model"].state_dict(), save / "lm.ckpt")
    # the hparams as an experiment folder keeps them: the overrides applied
    (folder / "hyperparams.yaml").write_text(resolve_references(text, overrides).getvalue(), encoding="utf-8")
    return folder / "hyperparams.yaml", save


def utterance_lengths(n, seed, metadata_dir=None):
    """Samples (16 kHz) of ``n`` utterances: uniform in 1-3 s, or the encoder frames of the real
    metadata files (x 640 samples: 10 ms hop, 4x subsampling), drawn at random."""
    generator = torch.Generator().manual_seed(seed)
    if metadata_dir is None:
        return [int(16000 * (1.0 + 2.0 * torch.rand(1, generator=generator).item())) for _ in range(n)]
    frames = []
    for path in sorted(Path(metadata_dir).glob("*_metadata.json")):
        frames += json.loads(path.read_text(encoding="utf-8"))["ctc_frame_lens"]
    picks = torch.randint(len(frames), (n,), generator=generator).tolist()
    return [frames[i] * 640 for i in picks]


def write_audio(folder, lengths, seed):
    """Noise waveforms of ``lengths`` samples as 16 kHz wav files; returns their Utterances."""
    import soundfile

    from local.sa_models import Utterance

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    utts = []
    for i, n in enumerate(lengths):
        wav = 0.1 * torch.randn(n, generator=generator)
        path = folder / f"utt{i:04d}.wav"
        soundfile.write(path, wav.numpy(), 16000, subtype="PCM_16")
        utts.append(Utterance(f"M08_B3_CW{i + 1}_M5", str(path), "WORD", n / 16000))
    return utts


class Clock:
    """CPU seconds of this process on a CPU; wall seconds (after synchronising) on a GPU."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"

    def __call__(self):
        if self.cuda:
            torch.cuda.synchronize()
            return time.perf_counter()
        return time.process_time()


def speechbrain_searcher(model, lm, settings):
    """SpeechBrain's own test search of one SA model, as the SA pipeline's yaml builds it."""
    from speechbrain.decoders import S2STransformerBeamSearcher
    from speechbrain.decoders.scorer import CTCScorer, ScorerBuilder, TransformerLMScorer

    scorer = ScorerBuilder(
        full_scorers=[
            TransformerLMScorer(language_model=lm, temperature=settings["lm_temperature"]),
            CTCScorer(ctc_fc=model.modules["ctc_lin"], blank_index=settings["blank_index"], eos_index=2),
        ],
        weights={"ctc": settings["ctc_weight"], "transformerlm": settings["lm_weight"]},
    )
    return S2STransformerBeamSearcher(
        modules=[model.modules["Transformer"], model.modules["seq_lin"]],
        bos_index=1,
        eos_index=2,
        min_decode_ratio=settings["min_decode_ratio"],
        max_decode_ratio=settings["max_decode_ratio"],
        beam_size=settings["beam_size"],
        temperature=settings["temperature"],
        using_eos_threshold=settings["using_eos_threshold"],
        length_normalization=settings["length_normalization"],
        scorer=scorer,
    )


@torch.no_grad()
def speechbrain_batch(utts, model, searcher):
    """SpeechBrain's pipeline on one batch: the padded waveforms through the model, then its search."""
    from local.sa_models import read_wav

    wavs = [read_wav(u, model) for u in utts]
    lengths = torch.tensor([len(w) for w in wavs], dtype=torch.float)
    batch = torch.nn.utils.rnn.pad_sequence(wavs, batch_first=True).to(model.device)
    wav_lens = (lengths / lengths.max()).to(model.device)
    m = model.modules
    feats = model.normalize(m["compute_features"](batch), wav_lens)
    enc = m["Transformer"].encode(m["CNN"](feats), wav_lens, pad_idx=0)
    return [[int(t) for t in h] for h in searcher(enc, wav_lens)[0]]


def time_batches(batches, decode_one, clock):
    """(seconds, hypotheses in batch order) of ``decode_one(batch)`` over ``batches``."""
    start, hyps = clock(), []
    for batch in batches:
        hyps += decode_one(batch)
    return clock() - start, hyps


def run(args):
    """The decode benchmark; prints its report (and a JSON line)."""
    from local.free_running import (
        SA_TEST_SEARCH,
        StreamDecoder,
        StreamIdentity,
        build_searcher,
        decode_batch,
        search_memory,
        search_settings,
    )
    from local.fusion import FusionStudent
    from local.sa_models import SAModel, load_language_model, set_tf32

    torch.set_num_threads(args.threads)
    set_tf32(False)
    device = torch.device(args.device)
    clock = Clock(device)
    work = Path(args.work)
    given = (
        ("lm_d_model", args.lm_d_model),
        ("lm_layers", args.lm_layers),
        ("d_model", args.d_model),
        ("num_encoder_layers", args.encoder_layers),
        ("num_decoder_layers", args.decoder_layers),
        ("d_ffn", args.d_ffn),
    )
    sizes = {k: v for k, v in given if v is not None}
    if args.lm_d_model is not None:
        sizes.update(lm_d_ffn=4 * args.lm_d_model, lm_nhead=max(1, args.lm_d_model // 64))
    streams = max(1, args.streams)
    models = {}
    for i in range(streams):
        name = f"S{i + 1:02d}"
        hparams, save = write_model(work / name, 1000 + i, sizes, args.eos_bias, args.blank_bias)
        models[name] = SAModel(name, hparams, save, device=device, precision=args.precision)
    first = next(iter(models.values()))
    settings, _ = search_settings(work / "S01" / "hyperparams.yaml")
    settings["beam_size"] = args.beam_size
    lm = load_language_model(work / "S01" / "hyperparams.yaml", work / "S01" / "save" / "lm.ckpt", device)
    lengths = utterance_lengths(args.utterances, args.seed, args.metadata_dir)
    utts = write_audio(work / "audio", lengths, args.seed)
    order = sorted(range(len(utts)), key=lambda i: (lengths[i], i))
    utts = [utts[i] for i in order]  # sorted by length, as decode.py's batches are

    def batches(size):
        return [utts[i : i + size] for i in range(0, len(utts), size)]

    scoring = args.ctc_scoring
    single = {"S01": StreamDecoder([first], StreamIdentity())}
    ours = {("beam", "S01"): build_searcher("beam", single["S01"], settings, 1, 2, lm, scoring).to(device)}
    ours_full = {("beam", "S01"): build_searcher("beam", single["S01"], settings, 1, 2, lm, "full").to(device)}
    theirs = speechbrain_searcher(first, lm, settings).to(device)
    student = FusionStudent("transformer", first.vocab_size, 15).to(device).eval()
    fused = {
        "one": StreamDecoder([first], student),
        "all": StreamDecoder(list(models.values()), student),
    }
    fused_searchers = {
        k: {("beam", k): build_searcher("beam", d, settings, 1, 2, lm, scoring).to(device)} for k, d in fused.items()
    }

    def recipe(systems, searchers, names):
        chosen = {n: models[n] for n in names}
        return lambda b: decode_batch(b, chosen, searchers, systems, args.precision)["beam"][next(iter(systems))]

    measures = {
        "speechbrain": lambda b: speechbrain_batch(b, first, theirs),
        "recipe_s1_full": recipe(single, ours_full, ["S01"]),
        "recipe_s1": recipe(single, ours, ["S01"]),
        "student_s1": recipe({"one": fused["one"]}, fused_searchers["one"], ["S01"]),
        "student_sN": recipe({"all": fused["all"]}, fused_searchers["all"], list(models)),
    }
    if scoring == "full":  # the same measure
        del measures["recipe_s1_full"]
    timings = {k: [] for k in (*measures, "recipe_s1_batch1")}
    hyps = {}
    for _ in range(args.rounds):
        for name, fn in measures.items():
            seconds, hyps[name] = time_batches(batches(args.batch_size), fn, clock)
            timings[name].append(seconds)
        seconds, hyps["recipe_s1_batch1"] = time_batches(batches(1), measures["recipe_s1"], clock)
        timings["recipe_s1_batch1"].append(seconds)
    # the memory of the SA test search (beam 66) of one SA model alone and of the student on 14
    memory = {
        (SA_TEST_SEARCH["beam_size"], s, scoring): search_memory(
            "beam",
            StreamDecoder([first] * s, student if s > 1 else StreamIdentity()),
            {**settings, "beam_size": SA_TEST_SEARCH["beam_size"]},
            args.memory_frames,
            scoring,
        )
        for s in (1, 14)
        for scoring in ("full", "partial")
    }
    report(args, settings, sizes, lengths, timings, hyps, memory, first)


def report(args, settings, sizes, lengths, timings, hyps, memory, model):
    n = len(lengths)
    unit = "wall seconds" if torch.device(args.device).type == "cuda" else "CPU seconds of the process"
    seconds = [s / 16000 for s in lengths]
    steps = statistics.median(len(h) for h in hyps["recipe_s1"])
    print(
        f"decode benchmark: SA architecture ({args.describe_model}), random weights (</s> bias {args.eos_bias}, "
        f"CTC blank bias {args.blank_bias}), device {args.device}, {args.threads} thread(s), precision {args.precision}"
    )
    lm = f"TransformerLM {sizes.get('lm_d_model', 768)} x {sizes.get('lm_layers', 12)} layers"
    ctc = "full" if args.ctc_scoring == "full" else "partial: 2 x beam candidates"
    print(
        f"search: beam {settings['beam_size']}, CTC {settings['ctc_weight']} ({ctc}), {lm} {settings['lm_weight']}, "
        f"temperature {settings['temperature']}; batch {args.batch_size}"
    )
    print(
        f"{n} utterances of {min(seconds):.1f}-{max(seconds):.1f} s "
        f"({'real UASpeech lengths' if args.metadata_dir else 'uniform in 1-3 s'}); median hypothesis "
        f"{steps:g} pieces; {args.rounds} round(s), times in {unit}, median [min-max] over rounds"
    )

    def rate(name):
        return [n / s for s in timings[name]]

    def spread(values, fmt):
        return f"{fmt.format(statistics.median(values))} [{fmt.format(min(values))}-{fmt.format(max(values))}]"

    full = "recipe_s1_full" if "recipe_s1_full" in timings else "recipe_s1"
    tag = "" if full == "recipe_s1" else f", CTC {args.ctc_scoring}"
    rows = [
        ("SpeechBrain S2STransformerBeamSearcher, S=1 (CTC full)", "speechbrain"),
        ("decode.py search, S=1 (CTC full)", full),
        *([(f"decode.py search, S=1{tag}", "recipe_s1")] if tag else []),
        (f"decode.py search, S=1{tag}, one utterance at a time", "recipe_s1_batch1"),
        (f"decode.py, student on 1 stream{tag}", "student_s1"),
        (f"decode.py, student on {args.streams} streams{tag}", "student_sN"),
    ]
    print()
    for label, name in rows:
        print(f"{label:<62} {spread(rate(name), '{:.2f}'):>22} utterances/s")
    same = sum(a == b for a, b in zip(hyps[full], hyps["speechbrain"]))
    print(
        f"\nhypotheses of decode.py equal to SpeechBrain's batched search: {same} of {n} (SpeechBrain's padded "
        f"batch is not a batch of one: its encoder reads the padding, its search runs to the longest utterance's "
        f"limit; decode.py's hypotheses are each utterance's alone, tested)"
    )

    def per_round(a, b):
        return [x / y for x, y in zip(rate(a), rate(b))]

    checks = [
        ("decode.py / SpeechBrain, S=1, CTC full, utterances/s", per_round(full, "speechbrain"), 0.9, ">="),
        (
            f"S={args.streams} / S=1 time (student)",
            [y / x for x, y in zip(timings["student_s1"], timings["student_sN"])],
            float(args.streams),
            "<=",
        ),
        (f"batch {args.batch_size} / batch 1, utterances/s", per_round("recipe_s1", "recipe_s1_batch1"), None, None),
    ]
    print()
    for name, values, target, op in checks:
        shown = spread(values, "{:.2f}")
        if target is None:
            print(f"{name:<62} {shown:>22}")
            continue
        ok = all(v >= target for v in values) if op == ">=" else all(v <= target for v in values)
        print(f"{name:<62} {shown:>22}  {'met' if ok else 'NOT met'} (target {op} {target:g})")
    print(f"\nmemory of the beam search per utterance of {args.memory_frames} encoder frames (search_memory, GiB):")
    for (beam, s, scoring), parts in memory.items():
        total = sum(parts.values()) / 2**30
        detail = ", ".join(f"{k} {v / 2**30:.3f}" for k, v in parts.items())
        who = "one SA model" if s == 1 else f"the student on {s} streams"
        print(f"  beam {beam}, {who:<26} CTC {scoring:<7}: {total:7.3f} ({detail})")
    print(
        "\nJSON "
        + json.dumps(
            {
                "args": {k: v for k, v in vars(args).items() if k != "work"},
                "timings": timings,
                "utterances": n,
                "memory": {f"{b}/{s}/{c}": p for (b, s, c), p in memory.items()},
                "vocab": model.vocab_size,
            }
        )
    )
