"""Variable-length ``[U_i, V]`` rows packed in one contiguous tensor, and their on-disk cache.

Both the teacher logits (``store.LogitStore``) and the KD targets (``kd.EnsembleTargets``) are
many small ``[U_i, V]`` blocks. Packing them into one ``[P + 1, V]`` tensor (the last row is zeros,
the padding row) with an offset per block lets a batch be gathered in one indexing operation.

The cache is a folder ``<cache_dir>/<kind>-<key>/`` holding ``data.bin`` (the raw packed tensor)
and ``header.json``. The key hashes everything the content depends on (the source files' size and
mtime, the tokenizer, the dtype, the fold's parameters), so a changed input gets a new folder.
A cached folder is used only if its header matches the key, the file has the expected size, and a
checksum of sampled rows matches; otherwise it is rebuilt. The folder appears under its final name
only once complete (built under a temporary name, then renamed), so a crash never leaves a
half-written cache that looks valid. ``data.bin`` is memory-mapped: a warm start reads nothing
up front, and several DDP ranks on one node share the same pages.
"""

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

CACHE_FORMAT = 2
_CHECK_ROWS = 4096


def cache_key(*parts):
    """A short stable hash of JSON-serialisable parts."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def file_signature(path):
    """(path, size, mtime_ns): what a cache built from this file depends on (None if absent: the
    reader then reports the missing file)."""
    try:
        st = os.stat(path)
    except OSError:
        return [str(path), None, None]
    return [str(Path(path).resolve()), st.st_size, st.st_mtime_ns]


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
        """``[..., max_len, V]`` float32 blocks in one indexing operation (zeros where padded)."""
        return self.data[self.rows(index, max_len)].float()


def _checksum(path, shape, dtype):
    """Sum (float64) of up to 4096 evenly spaced rows of a packed file: cheap, and catches a
    truncated or garbled file. Read with pread, not through the mapping, so that checking a cache
    does not make its pages resident in this process."""
    rows, width = shape
    row_bytes = width * _element_size(dtype)
    step = max(1, rows // _CHECK_ROWS)
    total = 0.0
    with open(path, "rb") as f:
        for row in range(0, rows, step):
            raw = os.pread(f.fileno(), row_bytes, row * row_bytes)
            if len(raw) != row_bytes:
                return None
            total += float(torch.frombuffer(bytearray(raw), dtype=dtype).sum(dtype=torch.float64))
    return total


def _element_size(dtype):
    return torch.empty((), dtype=dtype).element_size()


class PackedCache:
    """Builds or reuses the packed tensor of one ``kind`` (``store``, ``targets``) and ``key``."""

    def __init__(self, cache_dir, kind, key, shape, dtype):
        self.folder = Path(cache_dir) / f"{kind}-{key}"
        self.key, self.shape, self.dtype = key, tuple(int(s) for s in shape), dtype
        self.tmp = None

    def load(self):
        """The cached tensor (memory-mapped), or None if absent or not trustworthy."""
        try:
            header = json.loads((self.folder / "header.json").read_text())
            data_file = self.folder / "data.bin"
            numel = self.shape[0] * self.shape[1]
            if (
                header.get("format") != CACHE_FORMAT
                or header.get("key") != self.key
                or header.get("shape") != list(self.shape)
                or header.get("dtype") != str(self.dtype)
                or data_file.stat().st_size != numel * _element_size(self.dtype)
            ):
                return None
            if _checksum(data_file, self.shape, self.dtype) != header.get("checksum"):
                return None
            return torch.from_file(str(data_file), shared=False, size=numel, dtype=self.dtype).view(self.shape)
        except (OSError, ValueError, RuntimeError):
            return None

    def allocate(self):
        """A zero tensor backed by a new file in a temporary folder: fill it, then ``commit``."""
        self.tmp = self.folder.parent / f".{self.folder.name}.tmp-{os.getpid()}"
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        numel = self.shape[0] * self.shape[1]
        return torch.from_file(str(self.tmp / "data.bin"), shared=True, size=numel, dtype=self.dtype).view(self.shape)

    def commit(self, data):
        """Writes the header and moves the folder to its final name (atomically)."""
        header = {
            "format": CACHE_FORMAT,
            "key": self.key,
            "shape": list(self.shape),
            "dtype": str(self.dtype),
            "checksum": _checksum(self.tmp / "data.bin", self.shape, self.dtype),
        }
        (self.tmp / "header.json").write_text(json.dumps(header))
        if self.folder.exists():  # stale or corrupt (load() refused it), or made meanwhile by another run
            shutil.rmtree(self.folder, ignore_errors=True)
        try:
            os.replace(self.tmp, self.folder)
        except OSError:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def discard(self):
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)


def build_packed(cache_dir, kind, key, shape, dtype, fill):
    """The packed tensor of ``shape``: from the cache when valid, else made by ``fill(tensor)``
    (and cached when ``cache_dir`` is set). Returns (tensor, from_cache)."""
    if cache_dir is None:
        data = torch.zeros(shape, dtype=dtype)
        fill(data)
        return data, False
    cache = PackedCache(cache_dir, kind, key, shape, dtype)
    data = cache.load()
    if data is not None:
        return data, True
    data = cache.allocate()
    try:
        fill(data)
    except BaseException:
        cache.discard()
        raise
    cache.commit(data)
    return data, False
