"""The free-running decode at the end of train.py's test (``--models``): decode.py on the fold
folder the test has just written, so that a run given the SA models ends with decodes of the audio
(``wer_test_free_<key>*.txt``, ``free_running`` in test_results.json) beside its teacher-forced
figures (``wer_test.txt``), each file named for how it was decoded.

The options are train.py's (``hparams/logit_kd.yaml``): ``models`` (the SA models as decode.py
takes them; on the command line a mapping, since SpeechBrain's parser cuts a value at its "=":
``--models="{M08: /exp/M08/hyperparams.yaml:/exp/M08/save}"``), ``speaker_csv``, ``data_root`` and
``free_running`` (the searches). They are checked before training (the files exist; the CSV is
given). A search already in test_results.json is not redone (train.py's test rewrites that file, so
a rerun of a finished fold decodes again, with the same result). Under torchrun every process takes
part (decode.py shares the batches out). A decode that fails stops the run with decode.py's one
line (exit status 2); the trained model and the teacher-forced results are already written.
"""

import json
import logging
import sys
from pathlib import Path

logger = logging.getLogger(__name__)


def decode_arguments(hparams, run_opts):
    """decode.py's command line for the fold, or None when there is nothing to decode."""
    from local.options import model_items

    if not hparams.get("models"):
        return None
    models = model_items(hparams["models"])
    folder = Path(hparams["output_folder"])
    info = json.loads((folder / "test_results.json").read_text(encoding="utf-8"))
    todo = [s for s in hparams["free_running"] if s not in info.get("free_running", {})]
    if not todo:
        logger.info("free-running decodes %s already in %s: not redone", hparams["free_running"], folder)
        return None
    argv = [str(folder), "--models", *models, "--speaker_csv", str(hparams["speaker_csv"]), "--search", *todo]
    if hparams.get("data_root"):
        argv += ["--data_root", str(hparams["data_root"])]
    if run_opts.get("device"):
        argv += ["--device", str(run_opts["device"])]
    if run_opts.get("noprogressbar"):
        argv.append("--noprogressbar")
    return argv


def run_after_test(hparams, run_opts):
    """Runs decode.py on the finished fold when ``models`` is given (on every process)."""
    argv = decode_arguments(hparams, run_opts)
    if argv is None:
        return
    import decode  # the recipe's decode.py, beside train.py

    logger.info("free-running decode of the test audio: decode.py %s", " ".join(argv))
    code = decode.main(argv)
    if code:
        sys.exit(code)  # decode.py has printed its one line
