"""The same figures on every x86-64 CPU: the instruction-set paths of the CPU math libraries are
pinned to AVX2 before torch is imported.

PyTorch's CPU kernels (ATen) and its BLAS (Intel MKL) pick their code path from the processor: on
a CPU with AVX-512 they use AVX-512 kernels, whose sums are rounded in another order than the AVX2
ones. A student trained for 40 epochs amplifies those last-bit differences: the demo fold M08
keeps epoch 27 and scores WER 4.87 with the AVX-512 paths of this project's machines, and keeps
epoch 38 and scores 5.19 with the AVX2 paths (the same seed, one thread). So a results table made
on one machine would not reproduce on another. ``pin`` sets, unless the user set them already:

- ``ATEN_CPU_CAPABILITY=avx2``: ATen's vectorised kernels use their AVX2 versions;
- ``MKL_CBWR=AVX2``: MKL's conditional numerical reproducibility, its AVX2 code path;
- ``ONEDNN_MAX_CPU_ISA=AVX2``: oneDNN's kernels (convolutions, some matmuls) no wider than AVX2.

Every x86-64 CPU of the last decade has AVX2 (Intel since 2013, AMD since 2015). With these paths
pinned (and the threads and the torch version), whether a CPU has AVX-512 no longer changes the
figures: on this project's AVX-512 machines the pinned M08 fold keeps epoch 38 with WER 5.19, the
figures a reviewer's rerun on another machine gave before the pin (that machine's M01 fold does
not match the pinned one: something else differed there too). MKL documents its AVX2
mode as giving the same results on every processor that supports AVX2; that is the limit of this
claim (other processors were not available to test). On other processors (ARM) nothing is set.

It must happen before ``import torch`` (the libraries read these variables once), so importing
this module pins (the jobs import it first, on a line of its own); ``describe`` says what the
running process uses, for the results files.
"""

import os
import platform

PINNED = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def pin():
    """Sets the variables of ``PINNED`` that are not set yet (x86-64 only); returns those set."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return {}
    done = {}
    for key, value in PINNED.items():
        if key not in os.environ:
            os.environ[key] = value
            done[key] = value
    return done


def describe():
    """{"aten": capability in use, "mkl_cbwr": ..., "onednn_max_isa": ...}: what this process runs."""
    import torch

    return {
        "aten": torch.backends.cpu.get_cpu_capability(),
        "mkl_cbwr": os.environ.get("MKL_CBWR", "auto"),
        "onednn_max_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "auto"),
    }


pin()
