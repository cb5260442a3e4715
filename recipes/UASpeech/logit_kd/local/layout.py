"""The on-disk layout of a logit extraction: where the files of one (SA model, audio speaker) pair
live and which keys their metadata holds.

    <logit_root>/<MODEL>/<SPK>/<SPK>_decoder_logits.pt   # SA model MODEL on speaker SPK's audio
    <logit_root>/<MODEL>/<SPK>/<SPK>_ctc_logits.pt
    <logit_root>/<MODEL>/<SPK>/<SPK>_metadata.json
    <logit_root>/extraction_summary.json                 # optional

The diagonal (MODEL == SPK) is what the SA project extracted; off-diagonal pairs (a teacher's
model on another speaker's audio) are stored the same way. The reader (``store.py``, ``ctc.py``),
the writers (``extract_logits.py``, the synthetic demo tree) and the checks of a finished pair all
build these paths here.
"""

from pathlib import Path

SUMMARY_FILE = "extraction_summary.json"

# The keys of the real <SPK>_metadata.json files (the SA project's first extraction), in their
# order. ``vocab_size`` is a legacy key (the decoder's vocabulary): the SA project's current
# extraction script no longer writes it, and orders the keys differently.
METADATA_KEYS = (
    "model_name",
    "num_utterances",
    "vocab_size",
    "utterance_ids",
    "token_lens",
    "target_words",
    "vocab_size_decoder",
    "vocab_size_ctc",
    "ctc_frame_lens",
)
# What a reader needs of them (both generations of the SA files have these).
REQUIRED_METADATA_KEYS = ("utterance_ids", "target_words", "num_utterances")


def pair_folder(logit_root, model, speaker):
    """``<logit_root>/<model>/<speaker>``: SA model ``model`` on ``speaker``'s audio."""
    return Path(logit_root) / model / speaker


def pair_files(logit_root, model, speaker):
    """The three files of a pair: ``{"decoder", "ctc", "metadata"}`` -> path."""
    folder = pair_folder(logit_root, model, speaker)
    return {
        "decoder": folder / f"{speaker}_decoder_logits.pt",
        "ctc": folder / f"{speaker}_ctc_logits.pt",
        "metadata": folder / f"{speaker}_metadata.json",
    }


def describe_pair(model, speaker):
    """How messages name a pair."""
    return f"SA model {model} on speaker {speaker}"
