"""Datasets: fetch + verify IDX files, prepare uint8 splits, and serve batches from device memory.

Verification hashes the *decoded* IDX bytes, so any faithful mirror validates
(official gzip, re-compressed, or raw). Every file is written to a temporary
name and renamed only once verified, so a failed download never leaves a
half-written file behind that a later run could mistake for valid data.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import tempfile
import urllib.request
import weakref
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

from .errors import DataError
from .registry import Schema, choice, need

MIRROR_ENV = "GRADLAB_DATA_MIRROR"


@dataclass(frozen=True)
class IdxFile:
    name: str  # decoded file name, e.g. train-images-idx3-ubyte
    size: int  # decoded bytes
    md5: str  # md5 of the decoded bytes


# Decoded sizes and md5s: MNIST from ../shared/data/mnist/README.md (the well-known values);
# Fashion-MNIST decoded from Debian's dataset-fashion-mnist (packaged from zalandoresearch's repo;
# its .gz files are re-compressed, so only the decoded bytes can be compared).
DATASETS: Dict[str, List[IdxFile]] = {
    "mnist": [
        IdxFile("train-images-idx3-ubyte", 47040016, "6bbc9ace898e44ae57da46a324031adb"),
        IdxFile("train-labels-idx1-ubyte", 60008, "a25bea736e30d166cdddb491f175f624"),
        IdxFile("t10k-images-idx3-ubyte", 7840016, "2646ac647ad5339dbf082846283269ea"),
        IdxFile("t10k-labels-idx1-ubyte", 10008, "27ae3e4e09519cfbb04c329615203637"),
    ],
    "fashion_mnist": [
        IdxFile("train-images-idx3-ubyte", 47040016, "f4a8712d7a061bf5bd6d2ca38dc4d50a"),
        IdxFile("train-labels-idx1-ubyte", 60008, "9018921c3c673c538a1fc5bad174d6f9"),
        IdxFile("t10k-images-idx3-ubyte", 7840016, "8181f5470baa50b63fa0f6fddb340f0a"),
        IdxFile("t10k-labels-idx1-ubyte", 10008, "15d484375f8d13e6eb1aabb0c3f46965"),
    ],
}

LOCAL_SOURCES = {"fashion_mnist": ["/usr/share/datasets/fashion-mnist"]}


@dataclass
class DataConfig(Schema):
    name: str = choice(*DATASETS, "synthetic")  # synthetic: generated, for tests and smoke runs
    root: str = "data"  # where fetch/prepare write (relative to the working directory)
    val_size: int = 5000  # held out from the training set, seeded
    split_seed: int = 0  # seeds which training images are held out
    sequence: str = choice("rows", "pixels")  # how rnn/lstm read an image: 28 steps of 28, or 784 of 1
    synthetic_size: int = 2048  # training images when name=synthetic

    def check(self) -> None:
        need(self.val_size >= 1, "val_size", f"must be >= 1, got {self.val_size}")
        if self.name in DATASETS:
            train = DATASETS[self.name][0].size // 784
            need(self.val_size < train, "val_size", f"must leave training images (< {train}), got {self.val_size}")
        need(self.synthetic_size >= 1, "synthetic_size", f"must be >= 1, got {self.synthetic_size}")
        need(self.split_seed >= 0, "split_seed", f"must be >= 0, got {self.split_seed}")


def public_mirrors(name: str) -> List[str]:
    """The mirrors torchvision itself downloads from."""
    from torchvision import datasets

    cls = {"mnist": datasets.MNIST, "fashion_mnist": datasets.FashionMNIST}[name]
    return list(cls.mirrors)


# ---------------------------------------------------------------- verification
def decode(raw: bytes, origin: str = "data") -> bytes:
    """IDX bytes from a file's content, gzip-compressed or not. A damaged gzip stream raises
    DataError: besides EOFError (truncated) and BadGzipFile (bad CRC), zlib.error (corrupt
    deflate data) escapes gzip.decompress and would otherwise end the run with a traceback."""
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"{origin}: damaged gzip data ({exc})") from None
    return raw


def check_idx(spec: IdxFile, data: bytes, origin: str) -> None:
    if len(data) != spec.size:
        raise DataError(f"{origin}: {len(data)} bytes decoded, expected {spec.size} (truncated or not {spec.name})")
    digest = hashlib.md5(data).hexdigest()
    if digest != spec.md5:
        raise DataError(f"{origin}: md5 {digest} of the decoded content, expected {spec.md5} (corrupt file)")


def verify_file(spec: IdxFile, path: Path) -> None:
    """Raise DataError naming ``path`` and the fix if it does not hold ``spec``."""
    if not path.exists():
        raise DataError(f"{path}: missing. Run `dvc repro fetch` (or `python pipelines/fetch.py`).")
    try:
        data = decode(path.read_bytes(), str(path))
        check_idx(spec, data, str(path))
    except (DataError, OSError) as exc:
        raise DataError(f"{exc if isinstance(exc, DataError) else f'{path}: unreadable ({exc})'}. "
                        f"Delete {path} and run `dvc repro fetch` to fetch it again.") from None


def _read(base: str, fname: str) -> Tuple[bytes, str]:
    """Content of ``fname`` in a local dir or under a URL base, and where it came from."""
    if "://" in base:
        url = base.rstrip("/") + "/" + fname
        try:
            req = urllib.request.Request(url, headers={"User-Agent": "gradlab"})
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.read(), url
        except Exception as exc:  # noqa: BLE001 - any network failure moves to the next candidate
            raise DataError(f"{url}: {exc}") from None
    path = Path(base).expanduser() / fname
    if not path.exists():
        raise DataError(f"{path}: not found")
    return path.read_bytes(), str(path)


def _first_valid(name: str, spec: IdxFile) -> Tuple[bytes, str]:
    """Decoded content of ``spec`` from the first source holding a valid copy. Every candidate
    (.gz, then raw, in each source) is verified on its own, so a corrupt .gz does not hide a
    good raw file next to it."""
    problems = []
    for base in sources(name):
        for fname in (spec.name + ".gz", spec.name):
            try:
                raw, origin = _read(base, fname)
                data = decode(raw, origin)
                check_idx(spec, data, origin)
                return data, origin
            except (DataError, OSError) as exc:
                problems.append(str(exc))
    raise DataError(" | ".join(problems) or "no sources")


def sources(name: str) -> List[str]:
    out = []
    if os.environ.get(MIRROR_ENV):
        out.append(os.environ[MIRROR_ENV])
    out += LOCAL_SOURCES.get(name, [])
    out += public_mirrors(name)
    return out


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def raw_dir(root: str | Path, name: str) -> Path:
    return Path(root) / "raw" / name


def fetch(name: str, root: str | Path = "data", log=print) -> Path:
    """Fetch and verify the four IDX files of ``name`` into ``<root>/raw/<name>/`` (decoded)."""
    if name not in DATASETS:
        raise DataError(f"no downloadable dataset '{name}' (choose one of {', '.join(DATASETS)})")
    out = raw_dir(root, name)
    for spec in DATASETS[name]:
        target = out / spec.name
        if target.exists():
            try:
                verify_file(spec, target)
                log(f"ok      {target}")
                continue
            except DataError:
                log(f"corrupt {target}: fetching again")
        try:
            data, origin = _first_valid(name, spec)
        except DataError as exc:
            raise DataError(
                f"{target}: could not fetch a valid copy. Tried: {exc}. "
                f"Set {MIRROR_ENV} to a directory or URL holding the IDX files (e.g. ../shared/data/mnist)."
            ) from None
        try:
            _atomic_write(target, data)
        except OSError as exc:  # disk full, permissions: one line, and no partial file left
            raise DataError(f"{target}: cannot write ({exc}). Free space or fix permissions, then fetch again.") from None
        log(f"fetched {target} <- {origin}")
    return out


# ---------------------------------------------------------------- prepare
def parse_idx(data: bytes, origin: str) -> np.ndarray:
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 8:
        raise DataError(f"{origin}: not an unsigned-byte IDX file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(f"{origin}: header says {dims} but holds {body.size} values")
    return body.reshape(dims)


def prepared_path(root: str | Path, name: str, val_size: int = 5000, seed: int = 0) -> Path:
    """One file per (dataset, validation size, split seed): a run never rewrites another's splits."""
    return Path(root) / "prepared" / f"{name}-val{val_size}-seed{seed}.pt"


SPLIT_KEYS = ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y")


def splits_checksum(splits: dict) -> str:
    """SHA-256 (first 16 hex digits) of the split tensors themselves: names the exact data a run used."""
    h = hashlib.sha256()
    for key in SPLIT_KEYS:
        t = splits[key].contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(memoryview(t.numpy()).cast("B"))
    return h.hexdigest()[:16]


def prepare(name: str, root: str | Path = "data", val_size: int = 5000, seed: int = 0, log=print) -> Path:
    """Write train / val (seeded hold-out from train) / test uint8 splits to ``prepared_path(...)``,
    with the checksum of their content."""
    if name not in DATASETS:
        raise DataError(f"no dataset '{name}' to prepare (choose one of {', '.join(DATASETS)})")
    rd = raw_dir(root, name)
    arrays = {}
    for spec in DATASETS[name]:
        path = rd / spec.name
        verify_file(spec, path)
        arrays[spec.name] = parse_idx(path.read_bytes(), str(path))
    x = torch.from_numpy(arrays["train-images-idx3-ubyte"].copy())
    y = torch.from_numpy(arrays["train-labels-idx1-ubyte"].astype(np.int64))
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = perm[:val_size], perm[val_size:]
    splits = {
        "train_x": x[train_idx].clone(), "train_y": y[train_idx].clone(),
        "val_x": x[val_idx].clone(), "val_y": y[val_idx].clone(),
        "test_x": torch.from_numpy(arrays["t10k-images-idx3-ubyte"].copy()),
        "test_y": torch.from_numpy(arrays["t10k-labels-idx1-ubyte"].astype(np.int64)),
        "name": name, "val_size": val_size, "split_seed": seed,
    }
    splits["checksum"] = splits_checksum(splits)
    out = prepared_path(root, name, val_size, seed)
    buf = io.BytesIO()
    torch.save(splits, buf)
    try:
        _atomic_write(out, buf.getvalue())
    except OSError as exc:  # disk full, permissions: one line, and no partial file left
        raise DataError(f"{out}: cannot write ({exc.strerror or exc}). Free space or fix permissions, "
                        "then prepare again.") from None
    log(f"prepared {out}: train {len(train_idx)}, val {len(val_idx)}, test {len(splits['test_x'])}")
    return out


def synthetic_splits(size: int, val_size: int, seed: int = 1234) -> dict:
    """A learnable 10-class 28x28 dataset: one random template per class plus noise."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.rand(10, 28, 28, generator=g)

    def make(n):
        y = torch.randint(0, 10, (n,), generator=g)
        x = 0.6 * templates[y] + 0.4 * torch.rand(n, 28, 28, generator=g)
        return (x * 255).to(torch.uint8), y

    (tx, ty), (vx, vy), (sx, sy) = make(size), make(val_size), make(max(val_size, 256))
    return {"train_x": tx, "train_y": ty, "val_x": vx, "val_y": vy, "test_x": sx, "test_y": sy,
            "checksum": f"synthetic-{size}-{val_size}-{seed}", "name": "synthetic"}


def load_splits(cfg_data, log=print) -> dict:
    """The prepared splits for ``cfg_data``, fetching and preparing first if needed."""
    if cfg_data.name == "synthetic":
        return synthetic_splits(cfg_data.synthetic_size, cfg_data.val_size)
    path = prepared_path(cfg_data.root, cfg_data.name, cfg_data.val_size, cfg_data.split_seed)
    if not path.exists():
        fetch(cfg_data.name, cfg_data.root, log=log)  # a no-op when the raw files verify
        prepare(cfg_data.name, cfg_data.root, cfg_data.val_size, cfg_data.split_seed, log=log)
    return load_prepared(path)


_LOADED: Dict[str, tuple] = {}  # path -> (its (mtime, size) when verified, the splits): the last file loaded


def load_prepared(path: Path) -> dict:
    """The splits saved by ``prepare``, verified against their checksum; a DataError of one line
    (the file and the fix) if the file is unreadable, not a split file, or altered. torch's own
    messages span several lines and, for weights_only, suggest disabling the safety check, so
    only the exception type is kept. A process that trains many runs (a matrix worker) reads and
    verifies the file once, again when its modification time or size changes."""
    stat = path.stat()
    stamp = (stat.st_mtime_ns, stat.st_size)
    known = _LOADED.get(str(path))
    if known is not None and known[0] == stamp:
        return dict(known[1])
    splits = _verified(path)
    _LOADED.clear()
    _LOADED[str(path)] = (stamp, splits)
    return dict(splits)


def _verified(path: Path) -> dict:
    fix = "Delete it (the next run prepares it again from the raw files) or run `dvc repro prepare`."
    try:
        splits = torch.load(path, weights_only=True)
        ok = isinstance(splits, dict) and all(k in splits for k in (*SPLIT_KEYS, "checksum"))
        reason = "" if ok else "not a prepared split file"
    except Exception as exc:  # noqa: BLE001 - any load failure means the same fix
        reason = f"unreadable ({type(exc).__name__})"
    if not reason and splits_checksum(splits) != splits["checksum"]:
        reason = "its content does not match its checksum (damaged or altered)"
    if reason:
        raise DataError(f"{path}: {reason}. {fix}")
    return splits


# ---------------------------------------------------------------- device-resident batches
MEAN, STD = 0.1307, 0.3081


_RESIDENT: Dict[tuple, tuple] = {}  # (id of a uint8 split, device) -> (a weak reference to it, its normalized copy)


def to_device(x_uint8: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 images -> normalized float32 [N, 1, 28, 28] on ``device``: done once per split and
    device while the split is loaded (``load_prepared`` keeps it), not per batch or per run. Nothing
    writes into a split's images (a fault corrupts a copy of its batch)."""
    key = (id(x_uint8), str(device))
    known = _RESIDENT.get(key)
    if known is not None and known[0]() is x_uint8:
        return known[1]
    x = x_uint8.to(device, non_blocking=True).float().div_(255.0).sub_(MEAN).div_(STD).unsqueeze(1)
    for k in [k for k, (ref, _) in _RESIDENT.items() if ref() is None]:
        del _RESIDENT[k]
    _RESIDENT[key] = (weakref.ref(x_uint8), x)
    return x


class EpochOrder:
    """Which batch comes next: one seeded permutation per epoch, resumable mid-epoch."""

    def __init__(self, seed: int, n: int, batch_size: int):
        self.generator = torch.Generator().manual_seed(seed)
        self.n, self.batch_size = n, batch_size
        self.batches_per_epoch = -(-n // batch_size)
        self.epoch, self.batch = 0, 0
        self.perm: Optional[torch.Tensor] = None

    def batches(self, data: "DeviceData") -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """The rest of the current epoch's batches; ``batch`` counts each one handed out."""
        if self.perm is None:
            self.perm = torch.randperm(self.n, generator=self.generator)
        for x, y in data.shuffled_batches(self.batch_size, self.perm, self.batch):
            self.batch += 1
            yield x, y

    def total_steps(self, epochs: int, max_steps: Optional[int]) -> int:
        """A run's budget: ``epochs`` epochs, capped at ``max_steps``."""
        return min(epochs * self.batches_per_epoch, max_steps or epochs * self.batches_per_epoch)

    @property
    def epoch_done(self) -> bool:
        return self.batch >= self.batches_per_epoch

    def next_epoch(self) -> None:
        self.epoch, self.batch, self.perm = self.epoch + 1, 0, None

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch, "perm": self.perm, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batch, self.perm = state["epoch"], state["batch"], state["perm"]
        self.generator.set_state(state["generator"])


class DeviceData:
    """A split held on the training device; batches are index slices, not DataLoader copies."""

    def __init__(self, x_uint8: torch.Tensor, y: torch.Tensor, device: torch.device):
        self.x = to_device(x_uint8, device)
        self.y = y.to(device)
        self.device = device

    def __len__(self) -> int:
        return len(self.y)

    def shuffled_batches(self, batch_size: int, perm: torch.Tensor, start: int = 0) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """Batches in the order of ``perm`` (a CPU permutation), from batch index ``start``."""
        perm = perm.to(self.device)
        for i in range(start * batch_size, len(perm), batch_size):
            idx = perm[i:i + batch_size]
            yield self.x.index_select(0, idx), self.y.index_select(0, idx)

    def batches(self, batch_size: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        for i in range(0, len(self.y), batch_size):
            yield self.x[i:i + batch_size], self.y[i:i + batch_size]
