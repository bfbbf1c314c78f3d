"""Streaming reader and atomic writer: agreement with the safetensors library, validation of bad files,
no partial output on errors, shards, torch pickles loaded safely."""

import json
import os
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from checkpoint.fixtures_ckpt import fresh_gen, save
from ditq.checkpoint import io
from ditq.errors import CheckpointError


def assorted(gen):
    """Every dtype ditq may meet, odd sizes, a 0-d and an empty tensor, small and large (deferred and
    streamed) tensors."""
    big = io.SMALL_TENSOR_BYTES // 2 + 7  # bf16 elements: above the small-tensor threshold
    return {
        "w.bf16": torch.randn(big, generator=gen).to(torch.bfloat16),
        "w.f32": torch.randn(3, 333, generator=gen),
        "w.f16": torch.randn(17, 5, generator=gen).half(),
        "w.f64": torch.randn(3, generator=gen).double(),
        "w.e4m3": (torch.randn(65, 33, generator=gen) * 50).to(torch.float8_e4m3fn),
        "w.e5m2": (torch.randn(7, generator=gen) * 50).to(torch.float8_e5m2),
        "w.i8": torch.randint(-127, 128, (io.SMALL_TENSOR_BYTES + 3,), generator=gen, dtype=torch.int8),
        "w.u8": torch.randint(0, 256, (29,), generator=gen, dtype=torch.uint8),
        "w.i64": torch.randint(-(2**40), 2**40, (3,), generator=gen),
        "w.bool": torch.rand(11, generator=gen) > 0.5,
        "w.scalar": torch.randn((), generator=gen),
        "w.empty": torch.empty(0, 4),
    }


def _bits(t):
    return t.view(torch.uint8) if t.dtype.itemsize == 1 and t.dtype != torch.bool else t


def assert_same(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, a.shape, b.dtype, b.shape)
    assert torch.equal(_bits(a), _bits(b))


def test_writer_output_loads_in_safetensors_and_reader(tmp_path):
    gen, seed = fresh_gen()
    tensors = assorted(gen)
    dst = tmp_path / "out.safetensors"
    with io.SafetensorsWriter(dst, reserve=io.header_reserve(tensors)) as w:
        for k, t in tensors.items():
            w.add(k, t)
        w.commit({"a": "1", "b": json.dumps({"x": [1, 2]})})
    ref = load_file(str(dst))
    with safe_open(str(dst), "pt") as f:
        assert f.metadata() == {"a": "1", "b": json.dumps({"x": [1, 2]})}
    assert set(ref) == set(tensors), seed
    with io.open_checkpoint(dst) as ck:
        assert ck.metadata["a"] == "1"
        for k, t in tensors.items():
            assert_same(ref[k], t)
            assert_same(ck.get(k), t)
        # every tensor starts at a multiple of its element size (large ones streamed, small ones last)
        for k, t in tensors.items():
            assert ck.info(k).offset % t.element_size() == 0, (k, ck.info(k).offset)
    assert sorted(os.listdir(tmp_path)) == ["out.safetensors"]


def test_reader_matches_safetensors_library_file(tmp_path):
    gen, seed = fresh_gen()
    tensors = assorted(gen)
    path = save(tmp_path / "lib.safetensors", tensors, {"k": "v"})
    with io.open_checkpoint(path) as ck:
        assert set(ck.names) == set(tensors) and ck.metadata == {"k": "v"}
        assert ck.nbytes == sum(t.numel() * t.element_size() for t in tensors.values())
        got = dict(ck.iter_tensors())
        for k, t in tensors.items():
            assert_same(got[k], t)
        offsets = [ck.info(n).offset for n in ck.names]
        assert offsets == sorted(offsets)  # read in file order


def test_header_grows_when_the_reserve_is_too_small(tmp_path):
    gen, _ = fresh_gen()
    tensors = {f"a.very.long.name.{i}." + "x" * 40: torch.randn(3, generator=gen) for i in range(50)}
    tensors["big"] = torch.randn(io.SMALL_TENSOR_BYTES // 4 + 1, generator=gen)
    dst = tmp_path / "o.safetensors"
    with io.SafetensorsWriter(dst, reserve=16) as w:
        for k, t in tensors.items():
            w.add(k, t)
        w.commit({"m": "y" * 1000})
    ref = load_file(str(dst))
    for k, t in tensors.items():
        assert_same(ref[k], t)
    assert sorted(os.listdir(tmp_path)) == ["o.safetensors"]


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_writer_leaves_nothing_on_error_and_keeps_an_existing_file(tmp_path, exc):
    dst = tmp_path / "o.safetensors"
    dst.write_bytes(b"previous content")
    with pytest.raises(type(exc)):
        with io.SafetensorsWriter(dst) as w:
            w.add("a", torch.randn(io.SMALL_TENSOR_BYTES))  # streamed to the temporary file
            assert any(p.name.startswith(".o.safetensors.ditq-tmp") for p in tmp_path.iterdir())
            raise exc
    assert sorted(os.listdir(tmp_path)) == ["o.safetensors"]
    assert dst.read_bytes() == b"previous content"


def test_writer_without_commit_leaves_nothing(tmp_path):
    with io.SafetensorsWriter(tmp_path / "o.safetensors") as w:
        w.add("a", torch.ones(3))
    assert os.listdir(tmp_path) == []


def _write_raw(path, header: bytes, data: bytes = b""):
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


def test_truncated_file_names_the_tensor(tmp_path):
    gen, _ = fresh_gen()
    path = save(tmp_path / "t.safetensors", {"a": torch.randn(10, generator=gen), "b": torch.randn(1000, generator=gen)})
    raw = path.read_bytes()
    path.write_bytes(raw[:-100])
    with pytest.raises(CheckpointError, match=r"truncated.*'b'"):
        io.open_checkpoint(path)


@pytest.mark.parametrize(
    "header, match",
    [
        (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]', "does not parse"),
        (b"\xff\xfe garbage", "does not parse"),
        (b'[1, 2]', "not a JSON object"),
        (b'{"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}', "does not match its size"),
        (b'{"a": {"dtype": "F32"}}', "malformed"),
        (b'{"a": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}', "dtype F4"),
    ],
)
def test_corrupt_headers(tmp_path, header, match):
    path = _write_raw(tmp_path / "c.safetensors", header, b"\0" * 8)
    with pytest.raises(CheckpointError, match=match) as e:
        io.open_checkpoint(path)
    assert str(path) in str(e.value)


def test_header_length_beyond_file_and_tiny_file(tmp_path):
    p = tmp_path / "h.safetensors"
    p.write_bytes(struct.pack("<Q", 10**6) + b"{}")
    with pytest.raises(CheckpointError, match="header claims"):
        io.open_checkpoint(p)
    p.write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="only 3 bytes"):
        io.open_checkpoint(p)
    with pytest.raises(CheckpointError, match="does not exist"):
        io.open_checkpoint(tmp_path / "missing.safetensors")


def _sharded(tmp_path, gen):
    a = {"x.weight": torch.randn(4, 4, generator=gen), "x.bias": torch.randn(4, generator=gen)}
    b = {"y.weight": torch.randn(8, 4, generator=gen).half()}
    save(tmp_path / "m-00001-of-00002.safetensors", a, {"format": "pt"})
    save(tmp_path / "m-00002-of-00002.safetensors", b)
    wm = {**{k: "m-00001-of-00002.safetensors" for k in a}, **{k: "m-00002-of-00002.safetensors" for k in b}}
    (tmp_path / "m.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    return {**a, **b}


def test_sharded_folder_and_index(tmp_path):
    gen, _ = fresh_gen()
    tensors = _sharded(tmp_path, gen)
    for src in (tmp_path, tmp_path / "m.safetensors.index.json"):
        with io.open_checkpoint(src) as ck:
            assert set(ck.names) == set(tensors)
            for k, t in tensors.items():
                assert_same(ck.get(k), t)
            assert ck.file_size == sum(p.stat().st_size for p in tmp_path.glob("*.safetensors"))


def test_shard_index_pointing_at_a_missing_file(tmp_path):
    gen, _ = fresh_gen()
    _sharded(tmp_path, gen)
    (tmp_path / "m-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"m-00002-of-00002.safetensors.*missing.*'y.weight'"):
        io.open_checkpoint(tmp_path)


def test_shard_index_listing_a_tensor_its_shard_lacks(tmp_path):
    gen, _ = fresh_gen()
    _sharded(tmp_path, gen)
    idx = tmp_path / "m.safetensors.index.json"
    data = json.loads(idx.read_text())
    data["weight_map"]["z.weight"] = "m-00001-of-00002.safetensors"
    idx.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="'z.weight'"):
        io.open_checkpoint(tmp_path)


def test_folder_without_checkpoint(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(CheckpointError, match="transformer/ subfolder"):
        io.open_checkpoint(tmp_path)


def test_sharded_writer(tmp_path):
    gen, _ = fresh_gen()
    tensors = {f"l{i}.weight": torch.randn(64, 64, generator=gen) for i in range(6)}  # 16 KB each
    dst = tmp_path / "out"
    with io.ShardedWriter(dst, shard_bytes=40_000, reserve_per_shard=4096) as w:
        for k, t in tensors.items():
            w.add(k, t)
        w.commit(lambda names: {"n": str(len(names))})
    shards = sorted(dst.glob("*.safetensors"))
    assert len(shards) == 3 and shards[0].name == "model-00001-of-00003.safetensors"
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in tensors.values())
    with io.open_checkpoint(dst) as ck:
        for k, t in tensors.items():
            assert_same(ck.get(k), t)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with pytest.raises(CheckpointError, match="already exists"):
        io.ShardedWriter(dst, 1000)


def test_sharded_writer_cleans_up_on_error(tmp_path):
    with pytest.raises(RuntimeError):
        with io.ShardedWriter(tmp_path / "out", shard_bytes=1000) as w:
            w.add("a", torch.randn(1000))
            w.add("b", torch.randn(1000))
            raise RuntimeError("stop")
    assert os.listdir(tmp_path) == []


def test_torch_pickles(tmp_path):
    gen, _ = fresh_gen()
    sd = {"a.weight": torch.randn(4, 3, generator=gen), "a.bias": torch.randn(4, generator=gen).half()}
    torch.save(sd, tmp_path / "plain.pt")
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "nested.ckpt")
    torch.save(sd, tmp_path / "legacy.bin", _use_new_zipfile_serialization=False)
    for name in ("plain.pt", "nested.ckpt", "legacy.bin"):
        with io.open_checkpoint(tmp_path / name) as ck:
            assert set(ck.names) == set(sd), name
            for k, t in sd.items():
                assert_same(ck.get(k), t)


class NotATensor:
    pass


def test_torch_pickle_with_objects_is_refused(tmp_path):
    torch.save({"w": torch.ones(2), "obj": NotATensor()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        io.open_checkpoint(tmp_path / "evil.pt")


def test_prefetch_forwards_errors_and_order():
    def gen():
        yield from range(5)
        raise ValueError("in the reader thread")

    got = []
    with pytest.raises(ValueError, match="reader thread"):
        for x in io.prefetch(gen(), 2):
            got.append(x)
    assert got == list(range(5))
    # a consumer that stops early does not hang the producer
    it = io.prefetch(iter(range(1000)), 1)
    assert next(it) == 0
    it.close()
