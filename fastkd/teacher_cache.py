"""An on-disk cache of a teacher's top-k log-probabilities, written once, memory-mapped to train.

Layout of a cache directory (no pickle; raw little-endian arrays that ``numpy.memmap`` opens):

    index.json                      format, version, k, vocab_size, temperature, dtype, tokens,
                                    bytes_per_token and, per shard, its files, token count,
                                    byte sizes and CRC-32 checksums (plus any user metadata);
                                    header_crc32: the CRC-32 of each of these fields' JSON
    shard-00000.logprobs.bin        [tokens, k] float16 / bfloat16 / float32 log-probabilities
    shard-00000.indices.bin         [tokens, k] int32 vocabulary indices
    ...

Bytes per token: k * (2 + 4) for float16 / bfloat16 log-probabilities (6 k: 384 B at k = 64, 6 KiB
at k = 1024), k * 8 for float32. float16 is the default: log-probabilities lie in [-inf, 0], where
it keeps 11 significant bits to bfloat16's 8 (the tail mass 1 - sum p is sensitive to them).

Opening a cache reads ``index.json`` and checks every field of it: each against the shard files
where they tell (a shard's size against its token count, k and dtype; the token count against the
shards'), and each against its CRC-32 in the header's ``header_crc32`` (written with it), so that an
edited field (a dtype, a temperature) is a ``TeacherCacheError`` naming it, as is a truncated or
missing shard; ``verify=True`` / ``verify()`` also recomputes the shards' checksums (reads
everything); every read checks that its indices lie in [0, vocab_size). The index is written last,
atomically, by ``close()``: a writer that never closed leaves no index, hence no readable cache.

    with TeacherCache.writer("cache/", k=64, vocab_size=V, temperature=2.0) as w:
        for batch in data:
            w.append(fastkd.teacher_topk(teacher(batch), 64, temperature=2.0))
    cache = TeacherCache("cache/")
    topk = cache[1000:1512]          # tokens 1000..1511: a fastkd.TopK at temperature 2.0
"""
import bisect
import itertools
import json
import os
import zlib
from pathlib import Path

import numpy as np
import torch

from .topk_values import TopK, split_topk

FORMAT = "fastkd-teacher-cache"
FORMAT_VERSION = 2  # 2 adds header_crc32
READS_VERSIONS = (1, 2)
INDEX_FILE = "index.json"
PROGRESS_FILE = "progress.json"  # a resumable writer's finished shards, until its index is written
# name -> (numpy storage dtype, torch dtype); bfloat16 is stored as its raw 16 bits.
DTYPES = {"float16": (np.float16, torch.float16), "bfloat16": (np.uint16, torch.bfloat16),
          "float32": (np.float32, torch.float32)}
_CRC_CHUNK = 64 * 2**20


def _json_int(value):
    """An int of the index (a JSON integer, not a float, bool or string)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {value!r}")
    return value


def _json_of(kind):
    """A converter that takes a value of the index only if it is a ``kind`` (dict, list)."""
    def check(value):
        if not isinstance(value, kind):
            raise TypeError(f"expected a {kind.__name__}, got {type(value).__name__}")
        return value
    return check


def _header_crc32(index):
    """The CRC-32 of each field of ``index`` (its JSON text, keys sorted), ``header_crc32`` aside."""
    return {name: zlib.crc32(json.dumps(value, sort_keys=True).encode()) for name, value in index.items()
            if name != "header_crc32"}


def _check_header_crc32(index, index_path):
    """TeacherCacheError naming the first field of ``index`` edited (or added, or removed) since
    its writer checksummed the header."""
    stored = index.get("header_crc32")
    if not isinstance(stored, dict):
        raise TeacherCacheError(f"{index_path} is corrupted: field header_crc32 is missing or not a mapping")
    computed = _header_crc32(index)
    for name in sorted(set(stored) | set(computed)):
        if name not in computed:
            raise TeacherCacheError(f"{index_path} is corrupted: field {name} is missing")
        if stored.get(name) != computed[name]:
            raise TeacherCacheError(f"{index_path} is corrupted: field {name} = {index[name]!r} does not match its "
                                    "CRC-32 in header_crc32 (the header was edited after the cache was written)")


class TeacherCacheError(ValueError):
    """A cache directory that is missing, truncated, corrupted or of an unknown format."""


def _dtype_name(dtype):
    for name, (_, torch_dtype) in DTYPES.items():
        if dtype in (name, torch_dtype):
            return name
    raise ValueError(f"dtype must be one of torch.float16, torch.bfloat16, torch.float32, got {dtype!r}")


def _to_numpy(logprobs, name):
    """CPU numpy array of ``logprobs`` in the storage dtype ``name`` (bfloat16: its raw bits)."""
    x = logprobs.detach().to(DTYPES[name][1]).cpu().contiguous()
    return x.view(torch.int16).numpy().view(np.uint16) if name == "bfloat16" else x.numpy()


def _write_atomically(path, obj):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _file_crc32(path):
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CRC_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


class TeacherCacheWriter:
    """Appends tokens' top-k log-probabilities and indices to shards of ``tokens_per_shard`` tokens
    (the last one shorter); ``close()`` (or leaving the ``with`` block) writes the index."""

    def __init__(self, path, *, k, vocab_size, temperature, dtype=torch.float16, tokens_per_shard=2**20,
                 overwrite=False, metadata=None):
        for name, value in (("k", k), ("vocab_size", vocab_size), ("tokens_per_shard", tokens_per_shard)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if k > vocab_size:
            raise ValueError(f"k={k} exceeds vocab_size={vocab_size}")
        if vocab_size > 2**31 - 1:
            raise ValueError(f"vocab_size={vocab_size} does not fit the int32 indices")
        temperature = float(temperature)
        if not temperature > 0 or temperature == float("inf"):
            raise ValueError(f"temperature must be finite and > 0, got {temperature}")
        self.path = Path(path)
        if (self.path / INDEX_FILE).exists() and not overwrite:
            raise FileExistsError(f"{self.path} already holds a teacher cache; pass overwrite=True to replace it")
        self.path.mkdir(parents=True, exist_ok=True)
        if overwrite:
            for name in (INDEX_FILE, PROGRESS_FILE):
                (self.path / name).unlink(missing_ok=True)
            for old in self.path.glob("shard-*.bin"):
                old.unlink()
        self.k, self.vocab_size, self.temperature = k, vocab_size, temperature
        self.dtype = _dtype_name(dtype)
        self.tokens_per_shard = tokens_per_shard
        self.metadata = dict(metadata or {})
        json.dumps(self.metadata)  # fail now, not at close(), on metadata JSON cannot hold
        self._shards = []
        self._open = None  # the shard being written: its files, name, token count and checksums
        self._closed = False
        self._resumable = False

    @classmethod
    def resume(cls, path, **options):
        """A writer (``options`` as for the constructor) that records each finished shard in
        ``progress.json`` and, when that file is already there, continues after
        the shards it lists (checking their sizes and CRC-32s, and that ``options`` are the same),
        dropping any shard that was being written. Until ``close()`` writes the index (and removes
        ``progress.json``) the cache does not open. An interrupted, resumed writer leaves the same
        bytes as an uninterrupted one, given the same appends after ``written_tokens``."""
        writer = cls(path, **options)
        writer._resumable = True
        progress = writer.path / PROGRESS_FILE
        if progress.is_file():
            try:
                saved = json.loads(progress.read_text())
                header, shards = saved["header"], list(saved["shards"])
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
                raise TeacherCacheError(f"{progress} is corrupted: {e}") from None
            if header != json.loads(json.dumps(writer._header())):
                raise TeacherCacheError(f"{progress} was written with {header}, not {writer._header()}: "
                                        "resume with the same options, or delete the directory")
            for shard, part in itertools.product(shards, ("logprobs", "indices")):
                try:
                    file = _shard_file(writer.path, shard[part], progress)
                    intact = file.is_file() and file.stat().st_size == shard[f"{part}_bytes"] \
                        and _file_crc32(file) == shard[f"{part}_crc32"]
                except (KeyError, TypeError) as e:
                    raise TeacherCacheError(f"{progress} is corrupted: {type(e).__name__}: {e}") from None
                if not intact:
                    raise TeacherCacheError(f"shard file {file} does not match {progress}")
            writer._shards = shards
        kept = {shard[part] for shard in writer._shards for part in ("logprobs", "indices")}
        for old in writer.path.glob("shard-*.bin"):
            if old.name not in kept:
                old.unlink()
        return writer

    @property
    def written_tokens(self):
        """Tokens appended so far (for a resumed writer: those of the shards it kept)."""
        return sum(s["tokens"] for s in self._shards) + (self._open["tokens"] if self._open else 0)

    def _header(self):
        return {"k": self.k, "vocab_size": self.vocab_size, "temperature": self.temperature, "dtype": self.dtype,
                "tokens_per_shard": self.tokens_per_shard, "metadata": self.metadata}

    def append(self, logprobs, indices=None):
        """Append tokens: a ``fastkd.TopK`` (what ``teacher_topk`` returns), or ``logprobs`` (any
        float dtype, stored as ``dtype``) and ``indices`` (integers in [0, vocab_size)), both
        ``[..., k]``, on any device. A ``TopK`` taken at another temperature than the cache's is a
        ValueError; plain tensors are taken to be at the cache's temperature."""
        if self._closed:
            raise ValueError("this TeacherCacheWriter is closed")
        logprobs, indices = split_topk(logprobs, indices, self.temperature, "the cache's temperature",
                                       "append them to a cache opened at temperature={stored}, or take them "
                                       "again at the cache's")
        if not isinstance(logprobs, torch.Tensor) or not isinstance(indices, torch.Tensor):
            raise TypeError("logprobs and indices must be torch.Tensors")
        if logprobs.shape != indices.shape or logprobs.dim() == 0 or logprobs.shape[-1] != self.k:
            raise ValueError(f"logprobs {tuple(logprobs.shape)} and indices {tuple(indices.shape)} must both "
                             f"be [..., k] with k={self.k}")
        if not logprobs.is_floating_point() or indices.is_floating_point() or indices.dtype == torch.bool:
            raise TypeError(f"logprobs must be floating point and indices integer, "
                            f"got {logprobs.dtype} and {indices.dtype}")
        lp = _to_numpy(logprobs.reshape(-1, self.k), self.dtype)
        idx = indices.reshape(-1, self.k).cpu()
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.vocab_size):
            raise ValueError(f"indices must lie in [0, vocab_size) = [0, {self.vocab_size})")
        idx = idx.to(torch.int32).contiguous().numpy()
        start = 0
        while start < len(lp):
            if self._open is None:
                self._start_shard()
            take = min(len(lp) - start, self.tokens_per_shard - self._open["tokens"])
            self._write(lp[start:start + take], idx[start:start + take])
            start += take
            if self._open["tokens"] == self.tokens_per_shard:
                self._finish_shard()

    def _start_shard(self):
        name = f"shard-{len(self._shards):05d}"
        self._open = {"name": name, "tokens": 0, "logprobs_crc32": 0, "indices_crc32": 0,
                      "files": (open(self.path / f"{name}.logprobs.bin", "wb"),
                                open(self.path / f"{name}.indices.bin", "wb"))}

    def _write(self, lp, idx):
        shard = self._open
        for f, key, array in zip(shard["files"], ("logprobs_crc32", "indices_crc32"), (lp, idx)):
            data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
            f.write(data)
            shard[key] = zlib.crc32(data, shard[key])
        shard["tokens"] += len(lp)

    def _finish_shard(self):
        shard, self._open = self._open, None
        for f in shard["files"]:
            if self._resumable:  # on disk before progress.json names it
                f.flush()
                os.fsync(f.fileno())
            f.close()
        n, name = shard["tokens"], shard["name"]
        self._shards.append({
            "logprobs": f"{name}.logprobs.bin", "indices": f"{name}.indices.bin", "tokens": n,
            "logprobs_bytes": n * self.k * np.dtype(DTYPES[self.dtype][0]).itemsize,
            "indices_bytes": n * self.k * 4,
            "logprobs_crc32": shard["logprobs_crc32"], "indices_crc32": shard["indices_crc32"],
        })
        if self._resumable:
            _write_atomically(self.path / PROGRESS_FILE, {"header": self._header(), "shards": self._shards})

    def close(self):
        """Finish the last shard and write ``index.json`` (atomically). Returns the cache path."""
        if self._closed:
            return self.path
        if self._open is not None:
            self._finish_shard()
        item = np.dtype(DTYPES[self.dtype][0]).itemsize
        index = {"format": FORMAT, "format_version": FORMAT_VERSION, "k": self.k,
                 "vocab_size": self.vocab_size, "temperature": self.temperature, "dtype": self.dtype,
                 "index_dtype": "int32", "tokens": sum(s["tokens"] for s in self._shards),
                 "bytes_per_token": self.k * (item + 4), "shards": self._shards, "metadata": self.metadata}
        index["header_crc32"] = _header_crc32(index)
        _write_atomically(self.path / INDEX_FILE, index)
        (self.path / PROGRESS_FILE).unlink(missing_ok=True)
        self._closed = True
        return self.path

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        elif self._open is not None:  # leave no index: a half-written cache must not look complete
            for f in self._open["files"]:
                f.close()
            self._open, self._closed = None, True


def _shard_file(directory, name, index_path):
    """The shard file ``name`` of the cache in ``directory``: a plain file name (no folder, no
    ``..``) that resolves inside the directory (no link out of it), so that a cache from elsewhere
    can open nothing outside its own directory; TeacherCacheError otherwise."""
    plain = isinstance(name, str) and name not in ("", ".", "..") and not any(c in name for c in "/\\\0")
    if not plain or (directory / name).resolve().parent != directory.resolve():
        raise TeacherCacheError(f"{index_path} names the shard file {name!r}; shard files must be plain file "
                                "names inside the cache directory")
    return directory / name


class TeacherCache:
    """Reads a cache written by ``TeacherCache.writer``: ``cache[start:stop]`` (or ``read``) gives a
    ``fastkd.TopK`` ``(logprobs [n, k] in the stored dtype, indices [n, k] int32)`` at the cache's
    temperature, torch tensors copied from memory-mapped shards, for any token range (across shard
    boundaries too); ``cache[i]`` gives token i's (``[k]``).

    Attributes: ``k``, ``vocab_size``, ``temperature`` (pass it to ``topk_kd_loss``), ``dtype``,
    ``bytes_per_token``, ``shard_tokens``, ``metadata``; ``len(cache)`` is the token count.
    Picklable (e.g. into DataLoader workers): each process maps the shards on first use.
    """

    writer = TeacherCacheWriter

    def __init__(self, path, *, verify=False):
        self.path = Path(path)
        index_path = self.path / INDEX_FILE
        if not index_path.is_file():
            raise TeacherCacheError(f"{self.path} has no {INDEX_FILE}: not a teacher cache, or its writer never closed")
        try:
            index = json.loads(index_path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise TeacherCacheError(f"{index_path} is corrupted: {e}") from None
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            found = index.get("format") if isinstance(index, dict) else None
            raise TeacherCacheError(f"{index_path} is not a {FORMAT} index (field format = {found!r})")
        version = index.get("format_version")
        if version not in READS_VERSIONS:
            raise TeacherCacheError(f"{index_path} has field format_version = {version!r}; this fastkd reads versions "
                                    f"{', '.join(map(str, READS_VERSIONS))}")
        if version >= 2 or "header_crc32" in index:  # version 1 had no header_crc32
            _check_header_crc32(index, index_path)

        def field(name, convert, valid=lambda value: True, index=index, where=""):
            try:
                value = convert(index[name])
            except KeyError:
                raise TeacherCacheError(f"{index_path} is corrupted: field {where}{name} is missing") from None
            except (TypeError, ValueError, OverflowError) as e:
                raise TeacherCacheError(f"{index_path} is corrupted: field {where}{name}: {e}") from None
            if not valid(value):
                raise TeacherCacheError(f"{index_path} is corrupted: field {where}{name} = {index[name]!r} is invalid")
            return value

        self.k = field("k", _json_int, lambda k: k >= 1)
        self.vocab_size = field("vocab_size", _json_int, lambda v: self.k <= v < 2**31)
        self.temperature = field("temperature", float, lambda t: 0 < t < float("inf"))
        self._dtype_name = field("dtype", _dtype_name)
        field("index_dtype", str, lambda name: name == "int32")
        tokens = field("tokens", _json_int, lambda n: n >= 0)
        self.bytes_per_token = field("bytes_per_token", _json_int)
        self.metadata = field("metadata", _json_of(dict)) if version >= 2 else dict(index.get("metadata", {}))
        self.shards = field("shards", _json_of(list))
        self.dtype = DTYPES[self._dtype_name][1]
        item = np.dtype(DTYPES[self._dtype_name][0]).itemsize
        if self.bytes_per_token != self.k * (item + 4):
            raise TeacherCacheError(f"{index_path}: field bytes_per_token = {self.bytes_per_token} does not match "
                                    f"k * ({self._dtype_name} size + 4) = {self.k * (item + 4)}")
        self.shard_tokens = [field("tokens", _json_int, lambda n: n >= 0, shard, f"shards[{i}].")
                             for i, shard in enumerate(self.shards)]
        if sum(self.shard_tokens) != tokens:
            raise TeacherCacheError(f"{index_path} is corrupted: field tokens: its shards hold "
                                    f"{sum(self.shard_tokens)} tokens, its header says {tokens}")
        self._starts = [0, *itertools.accumulate(self.shard_tokens)]
        for i, (shard, n) in enumerate(zip(self.shards, self.shard_tokens)):
            for part, size_of, name in (("indices", 4, "k"), ("logprobs", item, "dtype")):
                name_of_file = field(part, lambda value: value, index=shard, where=f"shards[{i}].")
                file = _shard_file(self.path, name_of_file, index_path)
                if not file.is_file():
                    raise TeacherCacheError(f"shard file {file} is missing")
                size = file.stat().st_size
                if size != field(f"{part}_bytes", _json_int, index=shard, where=f"shards[{i}]."):
                    raise TeacherCacheError(f"shard file {file} is truncated or corrupted: {size} bytes, "
                                            f"expected {shard[f'{part}_bytes']}")
                if size != n * self.k * size_of:  # the indices' size checks k, then the log-probs' checks dtype
                    raise TeacherCacheError(
                        f"{index_path}: field {name} = {index[name]!r} (or shards[{i}].tokens) does not match shard "
                        f"file {file}: {size} bytes, not tokens * k * {size_of} = {n} * {self.k} * {size_of}")
        self._maps = {}
        if verify:
            self.verify()

    def __len__(self):
        return self._starts[-1]

    def __repr__(self):
        return (f"TeacherCache({str(self.path)!r}, tokens={len(self)}, k={self.k}, vocab_size={self.vocab_size}, "
                f"temperature={self.temperature}, dtype={self._dtype_name}, shards={len(self.shards)})")

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_maps"] = {}  # memory maps are per process
        return state

    def verify(self):
        """Recompute every shard's CRC-32 (reads the whole cache); TeacherCacheError on a mismatch."""
        for shard in self.shards:
            for part in ("logprobs", "indices"):
                file = self.path / shard[part]
                if _file_crc32(file) != int(shard[f"{part}_crc32"]):
                    raise TeacherCacheError(f"shard file {file} is corrupted: its CRC-32 does not match the index")

    def _shard_maps(self, i):
        if i not in self._maps:
            shape = (self.shard_tokens[i], self.k)
            storage = np.dtype(DTYPES[self._dtype_name][0]).newbyteorder("<")
            self._maps[i] = (np.memmap(self.path / self.shards[i]["logprobs"], dtype=storage, mode="r", shape=shape),
                             np.memmap(self.path / self.shards[i]["indices"], dtype="<i4", mode="r", shape=shape))
        return self._maps[i]

    def read(self, start, stop, *, device=None):
        """Tokens ``start`` to ``stop - 1``: a ``fastkd.TopK`` ``(logprobs [n, k], indices [n, k]
        int32)`` at the cache's temperature (which ``topk_kd_loss`` checks), on ``device`` when given."""
        n = len(self)
        if not 0 <= start <= stop <= n:
            raise IndexError(f"token range [{start}, {stop}) is outside [0, {n})")
        lps, idxs = [], []
        shard = bisect.bisect_right(self._starts, start) - 1
        at = start
        while at < stop:
            lo = self._starts[shard]
            take = min(stop, self._starts[shard + 1]) - at
            lp_map, idx_map = self._shard_maps(shard)
            lps.append(np.array(lp_map[at - lo:at - lo + take]))
            idxs.append(np.array(idx_map[at - lo:at - lo + take]))
            at += take
            shard += 1
        storage = DTYPES[self._dtype_name][0]
        lp = np.concatenate(lps) if lps else np.empty((0, self.k), storage)
        idx = np.concatenate(idxs) if idxs else np.empty((0, self.k), np.int32)
        if self._dtype_name == "bfloat16":
            lp = torch.from_numpy(lp.view(np.int16)).view(torch.bfloat16)
        else:
            lp = torch.from_numpy(lp.astype(storage, copy=False))
        idx = torch.from_numpy(idx.astype(np.int32, copy=False))
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.vocab_size):
            raise TeacherCacheError(f"{self.path} is corrupted: an index in tokens [{start}, {stop}) "
                                    f"lies outside [0, {self.vocab_size})")
        if device is not None:
            lp, idx = lp.to(device), idx.to(device)
        return TopK(lp, idx, self.temperature)

    def __getitem__(self, item):
        if isinstance(item, slice):
            start, stop, step = item.indices(len(self))
            if step != 1:
                raise IndexError("TeacherCache slices take step 1 (read contiguous token ranges)")
            return self.read(start, max(start, stop))
        if isinstance(item, (int, np.integer)) and not isinstance(item, bool):
            i = int(item) + (len(self) if item < 0 else 0)
            if not 0 <= i < len(self):
                raise IndexError(f"token {item} is outside a cache of {len(self)} tokens")
            return self.read(i, i + 1).rows(0)
        raise TypeError(f"TeacherCache indices are ints or slices, got {type(item).__name__}")
