"""Result files written atomically: a reader (or a crash) never sees a half-written file; a full
disk is reported as such, naming the file, and leaves the previous content in place."""

import contextlib
import errno
import json
import os
import tempfile
from pathlib import Path


class DiskFullError(OSError):
    """No space left on the device of ``path``: one line that names it."""

    def __init__(self, path, detail=""):
        super().__init__(errno.ENOSPC, f"no space left on device: {path}" + (f" ({detail})" if detail else ""))
        self.path = path

    def __str__(self):
        return self.strerror


def is_disk_full(err):
    """Whether an exception is a full disk (or quota), also when torch wrapped the OSError into a
    RuntimeError ("unexpected pos ..." from a torch.save that could not write)."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err)
    return "No space left on device" in text or "unexpected pos" in text


@contextlib.contextmanager
def atomic_file(path, mode="w"):
    """A file object on a temporary name beside ``path``; on success it is flushed to disk,
    given the usual permissions (mkstemp makes 0600) and renamed over ``path``; on failure it is
    removed and ``path`` keeps its old content."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    text = {} if "b" in mode else {"encoding": "utf-8", "newline": ""}
    try:
        with os.fdopen(fd, mode, **text) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        if is_disk_full(err):
            raise DiskFullError(path) from None
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write(path, write, binary=False):
    """Writes ``path`` through ``write(handle)`` atomically."""
    with atomic_file(path, "wb" if binary else "w") as handle:
        write(handle)


def write_json(path, data, indent=2):
    with atomic_file(path) as handle:
        json.dump(data, handle, indent=indent, ensure_ascii=False)
        handle.write("\n")
