"""The on-disk teacher cache: bit-exact round trips, uneven shards, and clear errors on damage."""
import json
import pickle

import pytest
import torch

import fastkd
from fastkd import TeacherCache, TeacherCacheError, teacher_cache


def teacher_outputs(tokens, k, V, *, dtype=torch.float32):
    lp = -torch.rand(tokens, k).mul(20).sort(-1).values.flip(-1)
    lp[0, -1] = float("-inf")  # a teacher with a masked vocabulary
    idx = torch.stack([torch.randperm(V)[:k] for _ in range(tokens)]).to(torch.int32)
    return lp.to(dtype), idx


def bits(x):
    """The raw bits of float tensor ``x``, as integers of its size (an exact comparison, NaN included)."""
    return x.view({2: torch.int16, 4: torch.int32}[x.element_size()])


def write(path, chunks, **kw):
    with TeacherCache.writer(path, **kw) as w:
        for lp, idx in chunks:
            w.append(lp, idx)
    return TeacherCache(path)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16, torch.float32))
def test_round_trip_is_bit_exact_across_uneven_shards(tmp_path, dtype):
    k, V = 5, 1000
    lp, idx = teacher_outputs(23, k, V, dtype=dtype)
    # appends of 4, 11 and 8 tokens into shards of 7: shards of 7, 7, 7, 2 tokens
    chunks = [(lp[:4], idx[:4]), (lp[4:15], idx[4:15]), (lp[15:], idx[15:])]
    cache = write(tmp_path, chunks, k=k, vocab_size=V, temperature=2.5, dtype=dtype, tokens_per_shard=7)
    assert cache.shard_tokens == [7, 7, 7, 2] and len(cache) == 23
    assert (cache.k, cache.vocab_size, cache.temperature, cache.dtype) == (k, V, 2.5, dtype)
    assert cache.bytes_per_token == k * (dtype.itemsize + 4)
    got_lp, got_idx = cache[:]
    assert got_lp.dtype == dtype and got_idx.dtype == torch.int32
    assert torch.equal(bits(got_lp), bits(lp))
    assert torch.equal(got_idx, idx)
    for start, stop in [(0, 1), (5, 16), (6, 7), (13, 23), (21, 23), (9, 9)]:  # within and across shards
        part_lp, part_idx = cache.read(start, stop)
        assert torch.equal(bits(part_lp), bits(lp[start:stop]))
        assert torch.equal(part_idx, idx[start:stop])
    one_lp, one_idx = cache[-1]
    assert torch.equal(one_idx, idx[22]) and one_lp.shape == (k,)
    cache.verify()


def test_float32_input_is_stored_as_the_cache_dtype_and_leading_dims_flatten(tmp_path):
    lp, idx = teacher_outputs(12, 3, 50)
    cache = write(tmp_path, [(lp.view(3, 4, 3), idx.view(3, 4, 3))], k=3, vocab_size=50, temperature=1.0)
    got_lp, got_idx = cache[:]
    assert cache.dtype == torch.float16 and torch.equal(got_lp, lp.to(torch.float16))
    assert torch.equal(got_idx, idx)


def test_cache_feeds_topk_kd_loss(tmp_path):
    V, k, T = 40, 6, 2.0
    teacher = torch.randn(10, V) * 3
    student = torch.randn(10, V) * 3
    topk = fastkd.teacher_topk(teacher, k, temperature=T)
    with TeacherCache.writer(tmp_path, k=k, vocab_size=V, temperature=T, dtype=torch.float32) as w:
        w.append(topk.rows(slice(0, 4)))
        w.append(topk.rows(slice(4, None)).view(2, 3, k))
    cache = TeacherCache(tmp_path)
    cached = cache[2:8]
    assert isinstance(cached, fastkd.TopK) and cached.temperature == T
    loss = fastkd.topk_kd_loss(student[2:8], cached, temperature=T)
    lp, idx = topk
    torch.testing.assert_close(loss, fastkd.topk_kd_loss(student[2:8], lp[2:8], idx[2:8], temperature=T))


def test_append_refuses_top_k_taken_at_another_temperature(tmp_path):
    """The cache's temperature is what every read declares: a TopK at another temperature (kept
    through the TopK's own reshaping and moves) is refused; plain tensors are taken to be at it."""
    teacher = torch.randn(6, 20)
    at_1 = fastkd.teacher_topk(teacher, 4, temperature=1.0)
    with TeacherCache.writer(tmp_path, k=4, vocab_size=20, temperature=2.0) as w:
        for wrong in (at_1, at_1.view(2, 3, 4), at_1.to(torch.float16), at_1.flatten(), at_1.rows(slice(1, 3))):
            with pytest.raises(ValueError, match=r"taken at temperature 1.0 .*the cache's temperature is 2.0"):
                w.append(wrong)
        with pytest.raises(TypeError, match="without teacher_indices"):
            w.append(at_1, at_1.indices)
        w.append(fastkd.teacher_topk(teacher, 4, temperature=2.0))
        w.append(*at_1)  # plain tensors: the caller's word
    assert len(TeacherCache(tmp_path)) == 12


def test_pickled_reader_reopens_its_maps(tmp_path):
    lp, idx = teacher_outputs(9, 2, 30)
    cache = write(tmp_path, [(lp, idx)], k=2, vocab_size=30, temperature=1.0, tokens_per_shard=4)
    cache[0:9]
    clone = pickle.loads(pickle.dumps(cache))
    assert clone._maps == {} and torch.equal(clone[3:6][1], idx[3:6])


def test_truncated_missing_and_corrupted_shards_are_clear_errors(tmp_path):
    lp, idx = teacher_outputs(20, 4, 100)
    write(tmp_path, [(lp, idx)], k=4, vocab_size=100, temperature=1.0, tokens_per_shard=8)
    shard = tmp_path / "shard-00001.logprobs.bin"
    good = shard.read_bytes()

    shard.write_bytes(good[:-3])
    with pytest.raises(TeacherCacheError, match="shard-00001.logprobs.bin is truncated"):
        TeacherCache(tmp_path)

    flipped = bytearray(good)
    flipped[5] ^= 0x40
    shard.write_bytes(bytes(flipped))
    TeacherCache(tmp_path)  # sizes are right: only the checksum can tell
    with pytest.raises(TeacherCacheError, match="shard-00001.logprobs.bin is corrupted: its CRC-32"):
        TeacherCache(tmp_path, verify=True)
    shard.write_bytes(good)
    TeacherCache(tmp_path, verify=True)

    indices = tmp_path / "shard-00002.indices.bin"
    bad_index = bytearray(indices.read_bytes())
    bad_index[0:4] = (1000).to_bytes(4, "little")
    indices.write_bytes(bytes(bad_index))
    with pytest.raises(TeacherCacheError, match=r"outside \[0, 100\)"):
        TeacherCache(tmp_path)[15:20]

    indices.unlink()
    with pytest.raises(TeacherCacheError, match="shard-00002.indices.bin is missing"):
        TeacherCache(tmp_path)


def test_damaged_or_missing_index(tmp_path):
    lp, idx = teacher_outputs(5, 2, 10)
    with pytest.raises(TeacherCacheError, match="no index.json"):
        TeacherCache(tmp_path)
    write(tmp_path, [(lp, idx)], k=2, vocab_size=10, temperature=1.0)
    index = tmp_path / "index.json"
    header = json.loads(index.read_text())
    index.write_text(index.read_text()[:40])
    with pytest.raises(TeacherCacheError, match="index.json is corrupted"):
        TeacherCache(tmp_path)
    index.write_text(json.dumps({**header, "format_version": 99}))
    with pytest.raises(TeacherCacheError, match="format_version = 99"):
        TeacherCache(tmp_path)
    index.write_text(json.dumps({**header, "tokens": 6}))
    with pytest.raises(TeacherCacheError, match="field tokens = 6 does not match its CRC-32"):
        TeacherCache(tmp_path)


def test_writer_errors_and_unfinished_writes(tmp_path):
    lp, idx = teacher_outputs(4, 3, 10)
    with pytest.raises(ValueError, match=r"\[..., k\] with k=2"):
        with TeacherCache.writer(tmp_path / "a", k=2, vocab_size=10, temperature=1.0) as w:
            w.append(lp, idx)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, vocab_size\)"):
        with TeacherCache.writer(tmp_path / "b", k=3, vocab_size=5, temperature=1.0) as w:
            w.append(lp, idx)
    with pytest.raises(TeacherCacheError, match="never closed"):  # the failed writer left no index
        TeacherCache(tmp_path / "b")
    write(tmp_path / "c", [(lp, idx)], k=3, vocab_size=10, temperature=1.0)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        TeacherCache.writer(tmp_path / "c", k=3, vocab_size=10, temperature=1.0)
    assert len(write(tmp_path / "c", [], k=3, vocab_size=10, temperature=1.0, overwrite=True)) == 0
    with pytest.raises(ValueError, match="dtype"):
        TeacherCache.writer(tmp_path / "d", k=3, vocab_size=10, temperature=1.0, dtype=torch.int8)
    with pytest.raises(ValueError, match="temperature"):
        TeacherCache.writer(tmp_path / "d", k=3, vocab_size=10, temperature=0.0)


@pytest.mark.parametrize("name", ["../outside.bin", "/etc/passwd", "sub/shard.bin", "..", "", 7, "link.bin"])
def test_shard_names_cannot_reach_outside_the_cache(tmp_path, name):
    """A cache from elsewhere names its shard files in index.json: only plain file names inside the
    cache directory are opened (a crafted name, or a link out of the folder, is a clear error)."""
    lp, idx = teacher_outputs(5, 2, 10)
    cache = tmp_path / "cache"
    write(cache, [(lp, idx)], k=2, vocab_size=10, temperature=1.0)
    outside = tmp_path / "outside.bin"
    outside.write_bytes((cache / "shard-00000.logprobs.bin").read_bytes())
    (cache / "link.bin").symlink_to(outside)
    index = cache / "index.json"
    header = json.loads(index.read_text())
    header["shards"][0]["logprobs"] = name
    header["header_crc32"] = teacher_cache._header_crc32(header)  # crafted with consistent checksums
    index.write_text(json.dumps(header))
    with pytest.raises(TeacherCacheError, match="plain file names inside the cache directory"):
        TeacherCache(cache)


@pytest.mark.parametrize("field, value", [
    ("format", "other"), ("format_version", 1), ("format_version", 3), ("k", 3), ("vocab_size", 50),
    ("temperature", 1.0), ("dtype", "bfloat16"), ("dtype", "float32"), ("index_dtype", "int64"), ("tokens", 19),
    ("bytes_per_token", 25), ("metadata", {"teacher": "other"}), ("shards", "first shard's tokens"),
    ("shards", "a checksum"), ("added", 1), ("header_crc32", None)])
def test_every_edited_header_field_is_named(tmp_path, field, value):
    """Every field of index.json is checked at open, against the shard files where they tell (sizes
    against k, dtype and token counts) and against its CRC-32 in header_crc32: an edit is a
    TeacherCacheError naming the field, never garbage values or numpy's mmap error."""
    lp, idx = teacher_outputs(20, 4, 100)
    write(tmp_path, [(lp, idx)], k=4, vocab_size=100, temperature=2.0, tokens_per_shard=8, metadata={"teacher": "t"})
    header = json.loads((tmp_path / "index.json").read_text())
    if field == "shards":
        header["shards"][0]["tokens" if value == "first shard's tokens" else "logprobs_crc32"] += 1
    elif value is None:
        del header[field]
    else:
        header[field] = value
    (tmp_path / "index.json").write_text(json.dumps(header))
    with pytest.raises(TeacherCacheError, match=rf"field {field}\b"):
        TeacherCache(tmp_path)


@pytest.mark.parametrize("field, value", [("k", 3), ("k", 5), ("dtype", "float32"), ("tokens", 21)])
def test_header_fields_are_checked_against_the_shards(tmp_path, field, value):
    """The same edits with the checksums rewritten to match (or a version-1 cache, which has none):
    the shard files' sizes still name the field."""
    lp, idx = teacher_outputs(20, 4, 100)
    write(tmp_path, [(lp, idx)], k=4, vocab_size=100, temperature=1.0, tokens_per_shard=8)
    header = json.loads((tmp_path / "index.json").read_text())
    header[field] = value
    if field in ("k", "dtype"):  # keep bytes_per_token consistent, so that the shards are what disagree
        item = {"float16": 2, "float32": 4}[header["dtype"]]
        header["bytes_per_token"] = header["k"] * (item + 4)
    header["header_crc32"] = teacher_cache._header_crc32(header)
    (tmp_path / "index.json").write_text(json.dumps(header))
    with pytest.raises(TeacherCacheError, match=rf"field {field}\b"):
        TeacherCache(tmp_path)
    del header["header_crc32"]
    (tmp_path / "index.json").write_text(json.dumps({**header, "format_version": 1}))
    with pytest.raises(TeacherCacheError, match=rf"field {field}\b"):
        TeacherCache(tmp_path)


def test_version_1_caches_still_open(tmp_path):
    lp, idx = teacher_outputs(5, 2, 10)
    write(tmp_path, [(lp, idx)], k=2, vocab_size=10, temperature=1.5, dtype=torch.float32)
    header = json.loads((tmp_path / "index.json").read_text())
    del header["header_crc32"]
    (tmp_path / "index.json").write_text(json.dumps({**header, "format_version": 1}))
    cache = TeacherCache(tmp_path, verify=True)
    assert cache.temperature == 1.5 and torch.equal(cache[:].logprobs, lp) and torch.equal(cache[:].indices, idx)


def test_resumed_writer_continues_after_its_finished_shards(tmp_path):
    """``TeacherCacheWriter.resume``: an interrupted writer's finished shards are kept (the one being
    written is dropped), and the result is byte for byte that of one uninterrupted writer."""
    k, V = 3, 50
    lp, idx = teacher_outputs(20, k, V, dtype=torch.float16)
    options = dict(k=k, vocab_size=V, temperature=1.0, tokens_per_shard=6)
    write(tmp_path / "whole", [(lp, idx)], **options)
    path = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        with TeacherCache.writer.resume(path, **options) as w:
            w.append(lp[:14], idx[:14])  # shards of 6 and 6 finished, 2 tokens of the third written
            raise KeyboardInterrupt
    assert (path / "shard-00002.logprobs.bin").stat().st_size == 2 * k * 2 and not (path / "index.json").exists()
    with pytest.raises(TeacherCacheError, match="resume with the same options"):
        TeacherCache.writer.resume(path, **{**options, "temperature": 2.0})
    w = TeacherCache.writer.resume(path, **options)
    assert w.written_tokens == 12 and not (path / "shard-00002.logprobs.bin").exists()
    w.append(lp[12:], idx[12:])
    w.close()
    assert {p.name: p.read_bytes() for p in path.iterdir()} == \
        {p.name: p.read_bytes() for p in (tmp_path / "whole").iterdir()}
    assert not (path / "progress.json").exists()


def test_resume_refuses_a_damaged_shard(tmp_path):
    options = dict(k=2, vocab_size=10, temperature=1.0, tokens_per_shard=4)
    lp, idx = teacher_outputs(6, 2, 10)
    w = TeacherCache.writer.resume(tmp_path, **options)
    w.append(lp, idx)  # one finished shard, recorded in progress.json; never closed
    shard = tmp_path / "shard-00000.indices.bin"
    shard.write_bytes(shard.read_bytes()[:-1] + b"\x01")
    with pytest.raises(TeacherCacheError, match="shard-00000.indices.bin does not match"):
        TeacherCache.writer.resume(tmp_path, **options)
