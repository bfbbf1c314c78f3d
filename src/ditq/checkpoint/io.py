"""Streaming checkpoint I/O: read one tensor at a time, write one tensor at a time.

Reading (``open_checkpoint``): a ``.safetensors`` file, a sharded folder (or its ``*.index.json``), or a
``.bin`` / ``.pt`` / ``.pth`` / ``.ckpt`` file. Safetensors files are parsed here rather than through
``safetensors.safe_open``: each tensor is read with one positioned read into a fresh buffer, so the
process never maps the file and its resident memory stays near the largest tensor, whatever the file
size. The header is validated up front (truncation, corrupt JSON, unknown dtypes, missing shards), so a
bad input fails before any output is written.

Writing (``open_writer``): a safetensors file is written to a temporary file in the destination folder
and renamed only when complete; any exception (including Ctrl-C) deletes it. Tensors are written as they
come: the header is written last into space reserved at the start of the file (padded with spaces, as
the format allows). Small tensors (scales, ``.comfy_quant``, biases, norms) are held back and written
in front of the large ones at the end, ordered so that every tensor stays aligned.
"""

from __future__ import annotations

import json
import math
import os
import queue
import shutil
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch

from ..errors import CheckpointError

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "BOOL": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in SAFETENSORS_DTYPES.items()}

TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
MAX_HEADER_BYTES = 100 * 2**20  # the safetensors library's own limit
SMALL_TENSOR_BYTES = 2**20  # tensors below this are deferred to the end of the file (alignment)


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise CheckpointError(f"dtype {dtype} cannot be stored in a safetensors file") from None


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lives and what it is, known without reading its data."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    offset: int = -1  # absolute byte offset in ``file`` (safetensors only)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def _tensor_from_bytes(buf: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """uint8 buffer -> tensor of ``dtype`` and ``shape`` (no copy)."""
    if buf.numel() == 0:
        return torch.empty(shape, dtype=dtype)
    return buf.view(dtype).reshape(shape)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor (contiguous copy only when needed)."""
    t = t.detach().contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


# -- readers -------------------------------------------------------------------------------------------
class SafetensorsFile:
    """One safetensors file: validated header, tensors read one at a time by positioned reads."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self.file_size = self.path.stat().st_size
            self._fh = open(self.path, "rb")
        except OSError as e:
            raise CheckpointError(f"cannot open {self.path}: {e.strerror or e}") from None
        try:
            self.infos, self.metadata, self.data_start = self._parse_header()
        except Exception:
            self._fh.close()
            raise

    def _corrupt(self, what: str) -> CheckpointError:
        return CheckpointError(
            f"{self.path} is not a valid safetensors file: {what}. The file is corrupt or truncated; "
            f"download or export it again"
        )

    def _parse_header(self):
        head = self._fh.read(8)
        if len(head) < 8:
            raise self._corrupt(f"it has only {self.file_size} bytes")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or 8 + n > self.file_size:
            raise self._corrupt(f"its header claims {n} bytes but the file has {self.file_size}")
        raw = self._fh.read(n)
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise self._corrupt(f"its JSON header does not parse ({e})") from None
        if not isinstance(header, dict):
            raise self._corrupt("its header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise self._corrupt("its __metadata__ is not a string-to-string map")
        data_start = 8 + n
        data_size = self.file_size - data_start
        infos: dict[str, TensorInfo] = {}
        for name, entry in header.items():
            try:
                dtype_str, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
                shape = tuple(int(s) for s in shape)
                begin, end = int(begin), int(end)
            except (KeyError, TypeError, ValueError):
                raise self._corrupt(f"the header entry of tensor {name!r} is malformed: {entry!r}") from None
            if dtype_str not in SAFETENSORS_DTYPES:
                raise CheckpointError(
                    f"{self.path}: tensor {name!r} has dtype {dtype_str}, which ditq cannot read "
                    f"(known: {', '.join(SAFETENSORS_DTYPES)}); exclude it or convert it with the tool that made it"
                )
            info = TensorInfo(name, SAFETENSORS_DTYPES[dtype_str], shape, self.path, data_start + begin)
            if min(shape, default=0) < 0 or begin < 0 or end - begin != info.nbytes:
                raise self._corrupt(
                    f"tensor {name!r} ({dtype_str} {list(shape)}) spans bytes [{begin}, {end}), "
                    f"which does not match its size of {info.nbytes} bytes"
                )
            if end > data_size:
                raise CheckpointError(
                    f"{self.path} is truncated: tensor {name!r} needs bytes up to {end} of the data section, "
                    f"which has only {data_size} bytes. Download or copy the file again"
                )
            infos[name] = info
        # read in file order: sequential disk access
        infos = dict(sorted(infos.items(), key=lambda kv: kv[1].offset))
        return infos, metadata, data_start

    def read(self, name: str) -> torch.Tensor:
        info = self.infos[name]
        buf = torch.empty(info.nbytes, dtype=torch.uint8)
        view = memoryview(buf.numpy()) if info.nbytes else memoryview(b"")
        got = 0
        while got < info.nbytes:  # one read returns at most ~2 GB on Linux
            n = os.preadv(self._fh.fileno(), [view[got:]], info.offset + got)
            if n <= 0:
                raise CheckpointError(
                    f"{self.path}: tensor {name!r} ended after {got} of {info.nbytes} bytes (the file changed "
                    f"or is truncated)"
                )
            got += n
        return _tensor_from_bytes(buf, info.dtype, info.shape)

    def close(self) -> None:
        self._fh.close()


class Checkpoint:
    """A readable checkpoint: tensor names, their infos without reading data, one tensor at a time.

    ``names`` are in read order (file order, shard by shard). ``metadata`` is the safetensors header
    metadata (of the first shard for sharded folders; ``file_metadata`` has each file's); ``file_size``
    the bytes on disk."""

    path: Path
    metadata: dict[str, str]
    file_size: int

    def __init__(self, path: Path):
        self.path = path
        self.metadata = {}
        self.file_metadata: list[dict[str, str]] = []  # one per file (shards may differ)
        self._infos: dict[str, TensorInfo] = {}

    # subclasses fill _infos and implement get()
    @property
    def names(self) -> list[str]:
        return list(self._infos)

    def info(self, name: str) -> TensorInfo:
        return self._infos[name]

    def __contains__(self, name: str) -> bool:
        return name in self._infos

    def __len__(self) -> int:
        return len(self._infos)

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data."""
        return sum(i.nbytes for i in self._infos.values())

    @property
    def files(self) -> list[Path]:
        return sorted({i.file for i in self._infos.values()})

    def get(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def iter_tensors(self, names: Iterable[str] | None = None, depth: int = 2) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor) in read order; a background thread reads up to ``prefetch`` tensors ahead
        so that disk reads overlap the caller's work. Memory: at most depth + 2 tensors alive."""
        names = list(self.names if names is None else names)
        if depth <= 0:
            for n in names:
                yield n, self.get(n)
            return
        yield from prefetch(((n, self.get(n)) for n in names), depth)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class SafetensorsCheckpoint(Checkpoint):
    """One or more safetensors files seen as one checkpoint (a single file, or the shards of an index)."""

    def __init__(self, path: Path, files: list[Path], weight_map: dict[str, str] | None = None, index: Path | None = None):
        super().__init__(path)
        self._files: dict[Path, SafetensorsFile] = {}
        try:
            for f in files:
                self._files[f] = SafetensorsFile(f)
            for sf in self._files.values():
                for name, info in sf.infos.items():
                    if weight_map is not None and weight_map.get(name) not in (None, sf.path.name):
                        continue  # the index assigns this tensor to another shard
                    if name in self._infos:
                        raise CheckpointError(
                            f"tensor {name!r} is in both {self._infos[name].file} and {sf.path}; "
                            f"remove the duplicate shard or pass one file"
                        )
                    self._infos[name] = info
            if weight_map is not None:
                missing = [n for n in weight_map if n not in self._infos]
                if missing:
                    raise CheckpointError(
                        f"{index}: lists {len(missing)} tensor(s) that are not in their shard, e.g. {missing[0]!r} in "
                        f"{weight_map[missing[0]]}; the shard is incomplete or from another version — download it again"
                    )
            first = next(iter(self._files.values()), None)
            self.metadata = dict(first.metadata) if first else {}
            self.file_metadata = [sf.metadata for sf in self._files.values()]
            self.file_size = sum(sf.file_size for sf in self._files.values())
        except Exception:
            self.close()
            raise

    def get(self, name: str) -> torch.Tensor:
        info = self._infos[name]
        return self._files[info.file].read(name)

    def close(self) -> None:
        for sf in self._files.values():
            sf.close()


class TorchCheckpoint(Checkpoint):
    """A pickled state dict (.bin/.pt/.pth/.ckpt), loaded with ``weights_only=True`` (no arbitrary code)
    and ``mmap=True`` where the file format allows it (zip files written by torch >= 1.6)."""

    def __init__(self, path: Path):
        super().__init__(path)
        self.file_size = path.stat().st_size
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e) and "zip" not in str(e):
                raise self._load_error(e) from None
            try:  # the legacy (non-zip) format cannot be memory-mapped
                obj = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e2:
                raise self._load_error(e2) from None
        except Exception as e:
            raise self._load_error(e) from None
        self._tensors: dict[str, torch.Tensor] = {}
        self.skipped: list[str] = []  # non-tensor entries (epoch counters, optimizer settings...)
        self._flatten(_unwrap_state_dict(obj), "")
        if not self._tensors:
            raise CheckpointError(f"{path} holds no tensors (top-level keys: {list(obj)[:8] if isinstance(obj, dict) else type(obj).__name__})")
        for name, t in self._tensors.items():
            self._infos[name] = TensorInfo(name, t.dtype, tuple(t.shape), path)

    def _load_error(self, e: Exception) -> CheckpointError:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            return CheckpointError(
                f"{self.path} contains pickled Python objects besides tensors ({msg[:200]}). ditq loads .bin/.pt/.ckpt "
                f"files with weights_only=True and never runs code from a checkpoint; re-save it as a plain state dict "
                f"or as .safetensors with a tool you trust"
            )
        return CheckpointError(f"cannot read {self.path} as a torch checkpoint ({msg[:300]}); the file may be truncated")

    def _flatten(self, obj, prefix: str) -> None:
        for k, v in obj.items():
            key = f"{prefix}{k}"
            if isinstance(v, torch.Tensor):
                self._tensors[key] = v
            elif isinstance(v, dict):
                self._flatten(v, key + ".")
            else:
                self.skipped.append(key)

    def get(self, name: str) -> torch.Tensor:
        # a copy, so that the caller's tensor does not pin the mapped file
        return self._tensors[name].clone()

    def close(self) -> None:
        self._tensors.clear()


def _unwrap_state_dict(obj):
    """Training checkpoints nest the weights: {'state_dict': {...}, 'epoch': 3}."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"expected a dict of tensors, got {type(obj).__name__}")
    for key in ("state_dict", "model", "module", "model_state_dict"):
        inner = obj.get(key)
        if isinstance(inner, dict) and any(isinstance(v, torch.Tensor) for v in inner.values()):
            return inner
    return obj


def _find_index(folder: Path) -> Path | None:
    found = sorted(folder.glob("*.safetensors.index.json"))
    if len(found) > 1:
        raise CheckpointError(f"{folder} holds several index files ({', '.join(p.name for p in found)}); pass one of them")
    return found[0] if found else None


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Open a checkpoint for streaming reads; validates headers and shards before returning.

    ``path``: a .safetensors file, a folder with one .safetensors file or a ``*.safetensors.index.json``
    (sharded), an index json itself, or a .bin/.pt/.pth/.ckpt file. Raises CheckpointError."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p} does not exist")
    if p.is_dir():
        index = _find_index(p)
        if index is None:
            files = sorted(p.glob("*.safetensors"))
            if not files:
                hint = " (a diffusers pipeline folder: pass its transformer/ subfolder)" if (p / "model_index.json").exists() else ""
                raise CheckpointError(f"{p} holds no .safetensors file and no *.safetensors.index.json{hint}")
            return SafetensorsCheckpoint(p, files)
        p = index
    if p.name.endswith(".index.json"):
        try:
            weight_map = json.loads(p.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError
        except (OSError, ValueError, KeyError, TypeError):
            raise CheckpointError(f"{p} is not a valid shard index (expected a JSON object with a 'weight_map')") from None
        shards = list(dict.fromkeys(weight_map.values()))
        for shard in shards:
            if not (p.parent / shard).is_file():
                example = next(k for k, v in weight_map.items() if v == shard)
                raise CheckpointError(
                    f"{p} points to shard {shard}, which is missing from {p.parent} (it holds e.g. tensor {example!r}); "
                    f"download the missing shard"
                )
        return SafetensorsCheckpoint(p.parent, [p.parent / s for s in shards], weight_map, index=p)
    if p.suffix == ".safetensors" or p.suffix == ".sft":
        return SafetensorsCheckpoint(p, [p])
    if p.suffix in TORCH_SUFFIXES:
        return TorchCheckpoint(p)
    # unknown suffix: sniff a safetensors header
    return SafetensorsCheckpoint(p, [p])


# -- memory ---------------------------------------------------------------------------------------------
def _load_libc():
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc
        return None


_LIBC = _load_libc()


_M_MMAP_THRESHOLD = -3


def release_memory() -> None:
    """Keep the resident size near the tensors alive (glibc; a no-op elsewhere).

    Streaming allocates and frees tensors of a few sizes from two threads. glibc serves blocks below its
    mmap threshold from per-thread heaps that it rarely shrinks, and it raises that threshold (up to 32 MB)
    each time a mapped block is freed, so without help the resident size creeps up with the number of
    tensors converted. Fixing the threshold at 4 MB makes every tensor-sized block a mapping that is
    returned when freed; ``malloc_trim`` hands back what the heaps hold."""
    if _LIBC is not None:
        _LIBC.mallopt(_M_MMAP_THRESHOLD, 4 << 20)
        _LIBC.malloc_trim(0)


# -- background prefetch -------------------------------------------------------------------------------
_DONE = object()


def prefetch(it: Iterator, depth: int = 2) -> Iterator:
    """Run ``it`` in a thread, ``depth`` items ahead; exceptions are re-raised in the consumer."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def work():
        try:
            for item in it:
                if stop.is_set():
                    return
                q.put(item)
            q.put(_DONE)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            q.put(e)

    t = threading.Thread(target=work, daemon=True, name="ditq-prefetch")
    t.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while t.is_alive():  # unblock the producer so it can see `stop`
            try:
                q.get(timeout=0.05)
            except queue.Empty:
                pass


# -- writers -------------------------------------------------------------------------------------------
def header_reserve(names: Iterable[str], metadata_bytes: int = 0, small_bytes: int = 0) -> int:
    """Bytes to reserve in front of the streamed tensors: a header holding ``names`` and metadata of
    about ``metadata_bytes``, plus ``small_bytes`` of small (held back) tensors."""
    return 4096 + metadata_bytes + small_bytes + sum(len(n) + 100 for n in names)


def _temp_path(dst: Path) -> Path:
    return dst.parent / f".{dst.name}.ditq-tmp-{os.getpid()}"


def _round_reserve(n: int) -> int:
    """Reserve such that the streamed region starts at a multiple of 64 bytes in the file."""
    return -(-(n + 8) // 64) * 64 - 8


class SafetensorsWriter:
    """Write one safetensors file tensor by tensor; nothing appears at ``dst`` until ``commit()``.

    Layout: [8-byte length][header, space-padded][small tensors][large tensors in the order added].
    Large tensors are written as they come, from a 64-byte aligned position; small ones (below
    ``small_bytes``) are held back and written in front of them at commit, ordered so that each starts at
    a multiple of its element size. ``reserve``: bytes kept in front of the large tensors for the header
    and the small tensors (``header_reserve``); if that proves too small, the large tensors are moved once
    (slower, still correct)."""

    def __init__(self, dst: str | os.PathLike, reserve: int = 1 << 20, small_bytes: int = SMALL_TENSOR_BYTES):
        self.dst = Path(dst)
        self.tmp = _temp_path(self.dst)
        self.reserve = _round_reserve(reserve)
        self.small_bytes = small_bytes
        self._large: dict[str, tuple[torch.dtype, list[int], int, int]] = {}
        self._small: dict[str, torch.Tensor] = {}
        self._pos = 0  # bytes of large tensors written so far
        self.committed = False
        try:
            self._fh = open(self.tmp, "w+b")  # readable too: _grow copies from it
            self._fh.seek(8 + self.reserve)
        except OSError as e:
            self._cleanup()
            raise CheckpointError(f"cannot write in {self.dst.parent}: {e.strerror or e}") from None

    @property
    def nbytes(self) -> int:
        """Data bytes added so far (written or held back)."""
        return self._pos + sum(t.numel() * t.element_size() for t in self._small.values())

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._large or name in self._small:
            raise CheckpointError(f"tensor {name!r} written twice to {self.dst}")
        tensor = tensor.detach()
        if tensor.device.type != "cpu":
            tensor = tensor.cpu()
        dtype_name(tensor.dtype)  # fail now on an unstorable dtype
        if tensor.numel() * tensor.element_size() < self.small_bytes:
            self._small[name] = tensor.contiguous()
            return
        data = tensor_bytes(tensor)
        try:
            self._fh.write(data)
        except OSError as e:
            raise CheckpointError(f"writing {self.dst} failed at tensor {name!r}: {e.strerror or e} (disk full?)") from None
        self._large[name] = (tensor.dtype, list(tensor.shape), self._pos, self._pos + len(data))
        self._pos += len(data)

    def commit(self, metadata: dict[str, str] | None = None) -> Path:
        """Write the header and the held-back tensors, fsync, rename to ``dst``. Returns ``dst``."""
        try:
            # narrowest elements first, so that the widest end exactly at the aligned large region
            small = sorted(self._small.items(), key=lambda kv: (kv[1].element_size(), kv[0]))
            tail = sum(t.numel() * t.element_size() for _, t in small)
            header: dict = {}
            if metadata:
                header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
            pos = 0
            for name, t in small:
                n = t.numel() * t.element_size()
                header[name] = {"dtype": dtype_name(t.dtype), "shape": list(t.shape), "data_offsets": [pos, pos + n]}
                pos += n
            for name, (dtype, shape, b, e) in self._large.items():
                header[name] = {"dtype": dtype_name(dtype), "shape": shape, "data_offsets": [tail + b, tail + e]}
            raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
            if len(raw) + tail > self.reserve:
                self._grow(len(raw) + tail)
            raw = raw + b" " * (self.reserve - tail - len(raw))
            self._fh.seek(0)
            self._fh.write(struct.pack("<Q", len(raw)) + raw)
            for _, t in small:
                self._fh.write(tensor_bytes(t))
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            os.replace(self.tmp, self.dst)
        except OSError as e:
            self.abort()
            raise CheckpointError(f"writing {self.dst} failed: {e.strerror or e} (disk full?)") from None
        except BaseException:
            self.abort()
            raise
        self._small.clear()
        self.committed = True
        return self.dst

    def _grow(self, need: int) -> None:
        """Move the large tensors further down to make room (rare: the reserve was too small)."""
        new_reserve = _round_reserve(need + 4096)
        grown = self.tmp.with_name(self.tmp.name + "-grow")
        with open(grown, "wb") as out:
            out.seek(8 + new_reserve)
            self._fh.flush()
            self._fh.seek(8 + self.reserve)
            shutil.copyfileobj(self._fh, out, 64 << 20)
        self._fh.close()
        os.replace(grown, self.tmp)
        self._fh = open(self.tmp, "r+b")
        self.reserve = new_reserve

    def abort(self) -> None:
        """Delete the temporary file; ``dst`` is left as it was."""
        self._small.clear()
        try:
            self._fh.close()
        except Exception:  # noqa: BLE001
            pass
        self._cleanup()

    def _cleanup(self) -> None:
        for p in (self.tmp, self.tmp.with_name(self.tmp.name + "-grow")):
            try:
                p.unlink()
            except FileNotFoundError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if not self.committed:
            self.abort()


class ShardedWriter:
    """Write a folder of safetensors shards plus ``model.safetensors.index.json``.

    Shards are filled up to ``shard_bytes`` each (a tensor larger than that gets a shard of its own).
    Everything goes to a temporary folder next to ``dst`` that is renamed on ``commit``; ``dst`` must
    not exist yet. ``metadata_for(names)`` gives each shard's header metadata from the names it holds."""

    def __init__(self, dst: str | os.PathLike, shard_bytes: int, reserve_per_shard: int = 1 << 20,
                 stem: str = "model"):
        self.dst = Path(dst)
        if self.dst.exists():
            raise CheckpointError(f"{self.dst} already exists; sharded output needs a new folder (remove it or pick another name)")
        self.tmp = _temp_path(self.dst)
        self.shard_bytes = shard_bytes
        self.reserve = reserve_per_shard
        self.stem = stem
        self.committed = False
        self._shards: list[tuple[SafetensorsWriter, list[str]]] = []
        try:
            self.tmp.mkdir(parents=False)
        except OSError as e:
            raise CheckpointError(f"cannot create a folder in {self.dst.parent}: {e.strerror or e}") from None

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if not self._shards or (self._shards[-1][0].nbytes and self._shards[-1][0].nbytes + size > self.shard_bytes):
            w = SafetensorsWriter(self.tmp / f"shard-{len(self._shards):05d}.safetensors", self.reserve)
            self._shards.append((w, []))
        w, names = self._shards[-1]
        w.add(name, tensor)
        names.append(name)

    @property
    def nbytes(self) -> int:
        return sum(w.nbytes for w, _ in self._shards)

    def commit(self, metadata_for=lambda names: {}, index_metadata: dict | None = None) -> Path:
        try:
            n = len(self._shards)
            weight_map, total = {}, 0
            for i, (w, names) in enumerate(self._shards):
                final = f"{self.stem}-{i + 1:05d}-of-{n:05d}.safetensors"
                total += w.nbytes
                w.dst = self.tmp / final
                w.commit(metadata_for(names))
                weight_map.update({k: final for k in names})
            index = {"metadata": {"total_size": total, **(index_metadata or {})}, "weight_map": weight_map}
            (self.tmp / f"{self.stem}.safetensors.index.json").write_text(json.dumps(index, indent=2))
            os.replace(self.tmp, self.dst)
        except BaseException:
            self.abort()
            raise
        self.committed = True
        return self.dst

    def abort(self) -> None:
        for w, _ in self._shards:
            if not w.committed:
                w.abort()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if not self.committed:
            self.abort()
