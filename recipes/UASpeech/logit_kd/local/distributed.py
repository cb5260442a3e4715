"""What every process of a run must agree on: whether the run may start, and the line it stops with.

Under ``torchrun`` a check that fails in one process only (the main process reading and packing the
inputs, taking the output folder's lock) must stop every process with the same clear line: the
others would otherwise wait at the next collective operation until torchrun kills them. Checks run
through ``agree`` share their outcome; ``stop`` prints the line, hands it to torchrun's error report
and, since torchrun prints that report after its workers have exited, has the main process repeat
the line once torchrun is gone, so that the line is the last thing on the console.
"""

import json
import os
import subprocess
import sys
import time

import torch
from speechbrain.utils.distributed import get_rank


def is_distributed():
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world_size():
    return torch.distributed.get_world_size() if is_distributed() else 1


def local_rank():
    return int(os.environ.get("LOCAL_RANK", 0))


def release_at_exit():
    """Destroys the process group when this process exits, while the interpreter is still whole.

    Without it, gloo's worker threads can still hold tensors when the interpreter is torn down, and
    the process then dies with "terminate called without an active exception" (SIGABRT) after its
    work is done: one torchrun run in tens failed that way, its results already written (a
    finished run now leaves by ``leave``, which also skips the teardown). Called once the group
    exists; a no-op where it was destroyed already."""
    import atexit

    def release():
        if is_distributed():
            torch.distributed.destroy_process_group()

    atexit.register(release)


def leave(code=0):
    """Ends a job's process with ``code``. Under torchrun, a process that finished its work waits
    for the others (a barrier), destroys the process group, flushes its output and ends with
    ``os._exit``, without the interpreter's teardown. With the group destroyed at exit only
    (``release_at_exit``), one CI run of three on one day still had a torchrun run fail: a process whose
    results were all written died in that teardown with "terminate called without an active
    exception" (SIGABRT, a C++ thread object destroyed while running), torchrun stopped the other
    and reported the run as failed. A failing process (``code`` != 0) leaves as before: the others
    may not reach the barrier."""
    if code == 0 and is_distributed():
        import logging

        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    sys.exit(code)


class RunError(Exception):
    """A reason to stop the run: one line, shown as it is."""


def first_error(message):
    """Every process passes its error message (or None); all get the first one, in rank order."""
    if not is_distributed():
        return message
    messages = [None] * world_size()
    torch.distributed.all_gather_object(messages, message)
    return next((m for m in messages if m), None)


def agree(func, *args, errors=(RunError,), on=None, **kwargs):
    """Runs ``func`` where ``on()`` is true (default: every process) and shares the outcome: if it
    fails with one of ``errors`` in any process, every process raises RunError with that message.
    Returns the function's result (None where it did not run)."""
    result, message = None, None
    if on is None or on():
        try:
            result = func(*args, **kwargs)
        except errors as err:
            message = str(err) or type(err).__name__
    message = first_error(message)
    if message:
        raise RunError(message)
    return result


def stop(message, code=1):
    """Ends this process with ``ERROR: <message>`` and a non-zero exit status (see the module
    docstring for what happens under torchrun)."""
    line = f"ERROR: {message}"
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:  # torchrun's failure report shows this instead of a pointer to its docs
        try:
            with open(error_file, "w", encoding="utf-8") as handle:
                json.dump(
                    {
                        "message": {
                            "message": line,
                            "extraInfo": {"py_callstack": line, "timestamp": str(int(time.time()))},
                        }
                    },
                    handle,
                )
        except OSError:
            pass
        if get_rank() in (0, None):
            _repeat_after(os.getppid(), line)
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
    sys.exit(code)


# Waits until torchrun has exited (gone, or a zombie not yet reaped by whoever started it: a
# caller that reads torchrun's output until the end reaps it only afterwards), then writes the line.
_REPEAT = """
import os, sys, time
parent = int(sys.argv[1])

def running(pid):
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
            return True
        except OSError:
            return False

for _ in range(36000):  # at most an hour
    if not running(parent):
        break
    time.sleep(0.05)
sys.stderr.write(sys.argv[2] + "\\n")
"""


def _repeat_after(parent, line):
    """A tiny detached process that writes ``line`` to this process's stderr once ``parent``
    (torchrun) has exited, after torchrun's own failure report."""
    try:
        subprocess.Popen(
            [sys.executable, "-c", _REPEAT, str(parent), line],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )
    except OSError:
        pass
