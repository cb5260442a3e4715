"""Run under torchrun (gloo, CPU): many epochs of checkpoints kept and deleted by two processes.

Every "epoch" each process saves a checkpoint with the recipe's CompleteCheckpointer and keeps the
two with the lowest loss, as train.py does; the processes sleep random, different times around the
save so that one lists the folder while the other is still writing. Deleting a checkpoint is a
collective operation: if the processes disagreed on the checkpoint set they would wait for each
other for ever (the test runs this under a timeout). Prints "done N" on the main process.
"""

import os
import random
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, sys.argv[2])  # the recipe folder
import local.checkpoints  # noqa: E402
from local.checkpoints import CompleteCheckpointer  # noqa: E402


def slow_replace(src, dst, _replace=local.checkpoints.os.replace):
    """The rename that makes a checkpoint visible, delayed as on a slow (network) file system: a
    process that lists the folder meanwhile does not see the new checkpoint yet."""
    time.sleep(0.02)
    _replace(src, dst)


class OsWithSlowReplace:
    """``os`` as local.checkpoints sees it, with the slow rename."""

    replace = staticmethod(slow_replace)

    def __getattr__(self, name):
        return getattr(os, name)


local.checkpoints.os = OsWithSlowReplace()


EPOCHS = int(sys.argv[3]) if len(sys.argv) > 3 else 40


def main():
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = torch.nn.Linear(64, 64)
    checkpointer = CompleteCheckpointer(Path(sys.argv[1]), recoverables={"model": model})
    jitter = random.Random(1234 + rank)
    for epoch in range(EPOCHS):
        time.sleep(jitter.random() * 0.01)
        checkpointer.save_and_keep_only(meta={"loss": (epoch * 7919) % 13 + 0.5}, min_keys=["loss"], num_to_keep=2)
        time.sleep(jitter.random() * 0.01)
    kept = checkpointer.list_checkpoints()
    dist.barrier()
    if rank == 0:
        print(f"done {EPOCHS} kept {len(kept)}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
