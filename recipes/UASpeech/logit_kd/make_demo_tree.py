#!/usr/bin/env python3
"""Write a SYNTHETIC logit extraction in exactly the on-disk format of the real one
(``local/synthetic.py`` says how its logits are made).

``train.py`` generates the small demo tree on first use by itself; this command writes one
explicitly, or one of the real corpus size for the benchmark.

Usage (from recipes/UASpeech/logit_kd)::

    python make_demo_tree.py --out demo_data                  # the demo tree (15 speakers, 44 words)
    python make_demo_tree.py --out /tmp/full --scale full     # the real utterance counts, vocab 5000
    python make_demo_tree.py --out /tmp/full --scale full --tokenizer_file sa_tokenizer.model \\
        --metadata_dir uaspeech/metadata                      # the real tokenizer, words and ids
"""

import argparse
import sys

from local.synthetic import DEMO_SEED, DemoTreeError, check_replaceable, generate_tree


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--out", required=True, help="folder to create (an earlier synthetic tree there is replaced; nothing else is)"
    )
    parser.add_argument("--scale", choices=("demo", "full"), default="demo")
    parser.add_argument("--seed", type=int, default=DEMO_SEED)
    parser.add_argument("--pairs", choices=("diagonal", "all"), default="diagonal")
    parser.add_argument("--tokenizer_file", help="use this SentencePiece model (e.g. the SA one)")
    parser.add_argument(
        "--metadata_dir", help="take utterance ids, words and frame counts from real <SPK>_metadata.json files"
    )
    parser.add_argument("--ctc", action="store_true", help="also write CTC logit files (every pair)")
    args = parser.parse_args(argv)
    try:
        check_replaceable(args.out)
    except DemoTreeError as err:
        sys.exit(f"ERROR: {err}")
    summary = generate_tree(
        args.out,
        scale=args.scale,
        seed=args.seed,
        pairs=args.pairs,
        tokenizer_file=args.tokenizer_file,
        metadata_dir=args.metadata_dir,
        ctc=args.ctc,
    )
    total = sum(summary["n_utterances"].values())
    print(
        f"wrote a SYNTHETIC logit tree to {args.out}: {len(summary['pairs'])} pairs, {total} utterances, "
        f"vocab {summary['vocab_size']}, {summary['decoder_float32_bytes'] / 2**20:.1f} MiB of decoder logits"
    )


if __name__ == "__main__":
    main()
