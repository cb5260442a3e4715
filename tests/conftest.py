"""Shared fixtures: the recipe's modules on sys.path, and the real SA artefacts when present."""

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "UASpeech" / "logit_kd"
sys.path.insert(0, str(RECIPE))

# The CPU math libraries' code paths pinned before any test imports torch, as every job pins them:
# a model trained in this process and one trained by a job in a subprocess (which inherits the
# pin) are then computed alike, whether or not this CPU has AVX-512.
from local import cpu_kernels  # noqa: E402, F401

# Real artefacts of the SA pipeline (tokenizer, 15 metadata files, SpeechBrain wer_*.txt files) live
# beside the checkout, never inside it. UASPEECH_SHARED points elsewhere if needed.
SHARED = Path(os.environ.get("UASPEECH_SHARED", REPO.parent / "shared" / "uaspeech"))

# The packed cache shared by the test runs of train.py that do not name their own (as the runs of
# one data tree share one in real use); removed when the session ends.
TEST_CACHE = Path(tempfile.mkdtemp(prefix="logit_kd_test_cache_"))


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(TEST_CACHE, ignore_errors=True)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests: tiny models run much faster on one thread (and do not
    fight over shared cores). Use with ``pytest.mark.usefixtures("one_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def check_table(name, results):
    """Asserts that the README/docs table ``name`` is what make_tables.py renders from ``results``."""
    import subprocess

    proc = subprocess.run(
        [sys.executable, str(RECIPE / "make_tables.py"), "--check", "--only", name, "--results", str(results)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=RECIPE,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture(scope="session")
def shared_uaspeech():
    """The folder of real SA artefacts; skips the test when it is absent."""
    if not (SHARED / "sa_tokenizer.model").is_file():
        pytest.skip(f"real SA artefacts not found at {SHARED} (set UASPEECH_SHARED to use them)")
    return SHARED


@pytest.fixture(scope="session")
def demo_tree(tmp_path_factory):
    """The embedded demo tree (all 15 speakers, diagonal), generated once per test session.
    Tests must not modify it: copy it (``copy_tree``) to craft bad input."""
    from local.synthetic import ensure_demo_tree

    folder = tmp_path_factory.mktemp("demo") / "demo_data"
    ensure_demo_tree(folder)
    return folder


@pytest.fixture(scope="session")
def demo_tree_cross(tmp_path_factory):
    """A demo tree with the pairs of the M16 cross fold under both ``cross_audio`` settings (F02 and
    M07 on every other speaker's audio, M16's included), as ``train.py`` has ``ensure_demo_tree``
    add them for ``input_streams: cross``."""
    from local.folds import store_pairs
    from local.synthetic import ensure_demo_tree

    folder = tmp_path_factory.mktemp("demo_cross") / "demo_data"
    train, test = store_pairs("M16", ["F02", "M07"], "cross", "all_others")
    ensure_demo_tree(folder, pairs=train + test)
    return folder


@pytest.fixture
def copy_tree(demo_tree, tmp_path):
    """A private copy of the demo tree for tests that damage it."""
    import shutil

    def _copy(speakers=None):
        dest = tmp_path / "tree"
        shutil.copytree(
            demo_tree,
            dest,
            ignore=None
            if speakers is None
            else (
                lambda d, names: [
                    n for n in names if d.endswith("logit_extraction") and len(n) == 3 and n not in speakers
                ]
            ),
        )
        return dest

    return _copy
