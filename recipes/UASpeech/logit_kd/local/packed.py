"""Variable-length ``[U_i, V]`` rows packed in one contiguous tensor, and their on-disk cache.

Both the teacher logits (``store.LogitStore``) and the KD targets (``kd.EnsembleTargets``) are
many small ``[U_i, V]`` blocks. Packing them into one ``[P + 1, V]`` tensor (the last row is zeros,
the padding row) with an offset per block lets a batch be gathered in one indexing operation.

The cache is a folder ``<cache_dir>/<kind>-<key>/`` holding ``data.bin`` (the raw packed tensor)
and ``header.json``. The key hashes everything the content depends on (the source files' size,
mtime and inode change time, the tokenizer, the dtype, the fold's parameters), so a changed input
gets a new folder. A cached folder is used only if its header matches the key, the file has the
expected size, and the CRC-32 of every byte matches (about a second per GB); otherwise it is
rebuilt. The folder appears under its final name only once complete (built under a temporary name,
then renamed), so a crash never leaves a half-written cache that looks valid, and the temporary
folder of a build whose process died is removed by the next build. ``data.bin`` is memory-mapped:
several DDP ranks on one node, and several runs of one data tree, share the same pages.
"""

import fcntl
import hashlib
import json
import os
import shutil
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from local.files import DiskFullError, is_disk_full

CACHE_FORMAT = 4


def cache_key(*parts):
    """A short stable hash of JSON-serialisable parts."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def file_signature(path):
    """(path, size, mtime_ns, ctime_ns): what a cache built from this file depends on (None if
    absent: the reader then reports the missing file). The inode change time cannot be set back,
    so a file rewritten with its size and mtime restored still gets a new key."""
    try:
        st = os.stat(path)
    except OSError:
        return [str(path), None, None, None]
    return [str(Path(path).resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _size(nbytes):
    """A byte count in the unit that shows it (``0.00 GiB`` told a user nothing)."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes} bytes"


class PackedRows:
    """Blocks ``[lengths[i], V]`` packed in ``data`` ``[sum(lengths) + 1, V]``."""

    def __init__(self, data, lengths):
        self.data = data
        self.lengths = torch.as_tensor(lengths, dtype=torch.long)
        self.offsets = torch.cumsum(self.lengths, 0) - self.lengths
        self.pad_row = int(self.lengths.sum())
        assert data.shape[0] == self.pad_row + 1, "packed data and lengths disagree"

    def block(self, i):
        """``[U_i, V]`` float32 block i."""
        start = int(self.offsets[i])
        return self.data[start : start + int(self.lengths[i])].float()

    def rows(self, index, max_len):
        """Row indices ``[..., max_len]`` of blocks ``index`` (-1 = none): pads point to the zero row."""
        index = torch.as_tensor(index, dtype=torch.long)
        safe = index.clamp(min=0)
        pos = torch.arange(max_len)
        rows = self.offsets[safe].unsqueeze(-1) + pos
        inside = (index >= 0).unsqueeze(-1) & (pos < self.lengths[safe].unsqueeze(-1))
        return torch.where(inside, rows, torch.full_like(rows, self.pad_row))

    def gather(self, index, max_len):
        """``[..., max_len, V]`` float32 blocks in one indexing operation (zeros where padded), on
        the device the data is on (a fold made resident on the GPU is gathered there)."""
        return self.data[self.rows(index, max_len).to(self.data.device)].float()

    def to(self, device):
        """Moves the packed data to ``device`` (the index stays on the CPU)."""
        self.data = self.data.to(device)
        return self


def file_crcs(path, chunk=64 * 2**20):
    """CRC-32 of every ``chunk`` bytes of a file, the whole file read (two threads: zlib and
    pread release the GIL, so this runs at the disk's or the page cache's speed). Read with pread,
    not through a mapping, so that checking a cache does not make its pages resident here."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:

        def crc(start, piece=4 * 2**20):
            value, end = 0, min(start + chunk, size)
            for at in range(start, end, piece):  # small reads: little memory held at a time
                value = zlib.crc32(os.pread(f.fileno(), min(piece, end - at), at), value)
            return value

        with ThreadPoolExecutor(max_workers=2) as pool:
            return list(pool.map(crc, range(0, size, chunk)))


def _element_size(dtype):
    return torch.empty((), dtype=dtype).element_size()


def _lock(path):
    """An exclusive, non-blocking lock on ``path`` (created): the open file, or None if held."""
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        return None
    return handle


def remove_abandoned(cache_dir):
    """Removes the temporary folders of builds whose process died (killed while building): a live
    build holds the lock of its folder's ``.building`` file."""
    for tmp in Path(cache_dir).glob(".*.tmp-*"):
        lock = _lock(tmp / ".building") if tmp.is_dir() else None
        if lock is not None:
            shutil.rmtree(tmp, ignore_errors=True)
            lock.close()


class PackedCache:
    """Builds or reuses the packed tensors of one ``kind`` (``store``, ``targets``) and ``key``: one
    file ``<name>.bin`` per array of ``arrays`` ({name: (shape, dtype)}; the main one is ``data``)."""

    def __init__(self, cache_dir, kind, key, arrays):
        self.folder = Path(cache_dir) / f"{kind}-{key}"
        self.key = key
        self.arrays = {name: (tuple(int(s) for s in shape), dtype) for name, (shape, dtype) in arrays.items()}
        self.nbytes = {name: _numel(shape) * _element_size(dtype) for name, (shape, dtype) in self.arrays.items()}
        self.tmp = self.building = None

    def _header(self, crcs):
        return {
            "format": CACHE_FORMAT,
            "key": self.key,
            "arrays": {
                n: {"shape": list(s), "dtype": str(d), "crc32": crcs.get(n)} for n, (s, d) in self.arrays.items()
            },
        }

    def load(self):
        """The cached tensors (memory-mapped), or None if absent or not trustworthy: the header must
        match the key, shapes and dtypes, and the CRC of every byte of every file must match."""
        try:
            header = json.loads((self.folder / "header.json").read_text())
            expected = self._header({})
            if header.get("format") != CACHE_FORMAT or header.get("key") != self.key:
                return None
            found = header.get("arrays", {})
            if set(found) != set(expected["arrays"]):
                return None
            tensors = {}
            for name, (shape, dtype) in self.arrays.items():
                path = self.folder / f"{name}.bin"
                entry = found[name]
                if entry.get("shape") != list(shape) or entry.get("dtype") != str(dtype):
                    return None
                if path.stat().st_size != self.nbytes[name] or file_crcs(path) != entry.get("crc32"):
                    return None
                tensors[name] = torch.from_file(str(path), shared=False, size=_numel(shape), dtype=dtype).view(shape)
            return tensors
        except (OSError, ValueError, RuntimeError, AttributeError):
            return None

    def allocate(self):
        """Zero tensors backed by new files in a temporary folder: fill them, then ``commit``. The
        files' blocks are reserved up front, so a full disk is an error here, not a SIGBUS when the
        mapping is written."""
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        remove_abandoned(self.folder.parent)
        self.tmp = self.folder.parent / f".{self.folder.name}.tmp-{os.getpid()}"
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self.building = _lock(self.tmp / ".building")
        tensors = {}
        for name, (shape, dtype) in self.arrays.items():
            path = self.tmp / f"{name}.bin"
            with open(path, "wb") as handle:
                try:
                    os.posix_fallocate(handle.fileno(), 0, max(1, self.nbytes[name]))
                except OSError as err:
                    self.discard()
                    if is_disk_full(err):
                        raise DiskFullError(
                            path, f"the packed cache needs {_size(sum(self.nbytes.values()))}"
                        ) from None
                    raise
            tensors[name] = torch.from_file(str(path), shared=True, size=_numel(shape), dtype=dtype).view(shape)
        return tensors

    def commit(self):
        """Writes the header and moves the folder to its final name (atomically). If another run
        committed the same cache meanwhile (a cache folder shared by several runs), that one is kept."""
        crcs = {name: file_crcs(self.tmp / f"{name}.bin") for name in self.arrays}
        (self.tmp / "header.json").write_text(json.dumps(self._header(crcs)))
        (self.tmp / ".building").unlink(missing_ok=True)
        if self.folder.exists():
            if self.load() is not None:  # made meanwhile by another run: use it, drop ours
                self.discard()
                return
            shutil.rmtree(self.folder, ignore_errors=True)  # stale or corrupt (load() refused it)
        try:
            os.replace(self.tmp, self.folder)
        except OSError:
            self.discard()
        if self.building is not None:
            self.building.close()

    def discard(self):
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
        if self.building is not None:
            self.building.close()
            self.building = None


def _numel(shape):
    n = 1
    for s in shape:
        n *= int(s)
    return n


def build_packed(cache_dir, kind, key, arrays, fill):
    """The packed tensors ``{name: tensor}`` of ``arrays`` ({name: (shape, dtype)}): from the cache
    when valid, else made by ``fill(tensors)`` (and cached when ``cache_dir`` is set). Returns
    (tensors, from_cache)."""
    if cache_dir is None:
        tensors = {name: torch.zeros(shape, dtype=dtype) for name, (shape, dtype) in arrays.items()}
        fill(tensors)
        return tensors, False
    cache = PackedCache(cache_dir, kind, key, arrays)
    tensors = cache.load()
    if tensors is not None:
        return tensors, True
    tensors = cache.allocate()
    try:
        fill(tensors)
    except BaseException:
        cache.discard()
        raise
    cache.commit()
    return tensors, False
