"""Data: the fetch verifier on good, corrupt and truncated files, atomic writes, seeded splits,
device batches, and the CLI's one-line data error. Everything runs on tiny IDX files written
here (gradlab.data.DATASETS is patched to describe them); nothing touches the network."""
from __future__ import annotations

import gzip
import hashlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import run_script
from gradlab import data
from gradlab.data import DataError, DeviceData, IdxFile

N_TRAIN, N_TEST, SIDE = 60, 12, 4
NAMES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


def idx_bytes(arr: np.ndarray) -> bytes:
    """An unsigned-byte IDX file: 0 0 8 ndim, big-endian dims, then the values."""
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def tiny_files() -> dict:
    """Image i carries its own index in pixel (0, 0), so splits can be traced; label = i % 10."""
    rng = np.random.default_rng(0)
    out = {}
    for prefix, n in (("train", N_TRAIN), ("t10k", N_TEST)):
        x = rng.integers(0, 256, (n, SIDE, SIDE), dtype=np.uint8)
        x[:, 0, 0] = np.arange(n)
        out[f"{prefix}-images-idx3-ubyte"] = idx_bytes(x)
        out[f"{prefix}-labels-idx1-ubyte"] = idx_bytes((np.arange(n) % 10).astype(np.uint8))
    return out


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    files = tiny_files()
    specs = [IdxFile(n, len(files[n]), hashlib.md5(files[n]).hexdigest()) for n in NAMES]
    monkeypatch.setitem(data.DATASETS, "mnist", specs)
    monkeypatch.setattr(data, "public_mirrors", lambda name: [])
    monkeypatch.setattr(data, "LOCAL_SOURCES", {})
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    monkeypatch.setenv(data.MIRROR_ENV, str(mirror))
    root = tmp_path / "data"
    return SimpleNamespace(files=files, specs={s.name: s for s in specs}, mirror=mirror, root=root,
                           raw=data.raw_dir(root, "mnist"))


def fill_mirror(tiny, gz=False, skip=()):
    for name, content in tiny.files.items():
        if name not in skip:
            if gz:
                (tiny.mirror / (name + ".gz")).write_bytes(gzip.compress(content, compresslevel=1))
            else:
                (tiny.mirror / name).write_bytes(content)


def flip(content: bytes, at: int) -> bytes:
    b = bytearray(content)
    b[at] ^= 0xFF
    return bytes(b)


def leftovers(d: Path):
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


# ---------------------------------------------------------------- verification
@pytest.mark.parametrize("gz", [False, True])
def test_fetch_good_files(tiny, gz):
    fill_mirror(tiny, gz=gz)
    logs = []
    out = data.fetch("mnist", tiny.root, log=logs.append)
    assert out == tiny.raw
    assert leftovers(out) == sorted(NAMES)  # stored decoded, no temp files
    for name in NAMES:
        assert (out / name).read_bytes() == tiny.files[name]
        data.verify_file(tiny.specs[name], out / name)
    assert sum(line.startswith("fetched") for line in logs) == 4
    logs.clear()
    data.fetch("mnist", tiny.root, log=logs.append)  # already there: verified, not fetched again
    assert all(line.startswith("ok") for line in logs) and len(logs) == 4


def test_verify_accepts_raw_and_gz(tiny, tmp_path):
    name = NAMES[0]
    raw, gz = tmp_path / name, tmp_path / (name + ".gz")
    raw.write_bytes(tiny.files[name])
    gz.write_bytes(gzip.compress(tiny.files[name], compresslevel=9))  # any faithful compression
    data.verify_file(tiny.specs[name], raw)
    data.verify_file(tiny.specs[name], gz)


def bad_copies(content: bytes) -> dict:
    g = gzip.compress(content)
    return {
        "corrupt": flip(content, len(content) // 2),  # right size, wrong md5
        "truncated": content[:-7],
        "truncated_gz": g[: len(g) // 2],  # EOFError inside gzip
        "corrupt_gz": flip(g, 10),  # zlib.error inside gzip (escaped the old verifier)
        "bad_crc_gz": flip(g, len(g) - 6),  # BadGzipFile
    }


@pytest.mark.parametrize("kind", list(bad_copies(b"x" * 200)))
def test_verify_rejects_damaged_file(tiny, tmp_path, kind):
    name = NAMES[0]
    path = tmp_path / name
    path.write_bytes(bad_copies(tiny.files[name])[kind])
    with pytest.raises(DataError) as err:
        data.verify_file(tiny.specs[name], path)
    msg = str(err.value)
    assert str(path) in msg and "dvc repro fetch" in msg and "\n" not in msg


def test_verify_missing_file(tiny):
    with pytest.raises(DataError, match="missing.*dvc repro fetch"):
        data.verify_file(tiny.specs[NAMES[0]], tiny.raw / NAMES[0])


# ---------------------------------------------------------------- fetch failures
@pytest.mark.parametrize("kind", ["corrupt", "truncated", "truncated_gz", "corrupt_gz", "bad_crc_gz"])
def test_fetch_rejects_damaged_source_and_leaves_nothing(tiny, kind):
    fill_mirror(tiny, skip=[NAMES[2]])
    bad = bad_copies(tiny.files[NAMES[2]])[kind]
    src = tiny.mirror / (NAMES[2] + (".gz" if kind.endswith("_gz") else ""))
    src.write_bytes(bad)
    with pytest.raises(DataError) as err:
        data.fetch("mnist", tiny.root, log=lambda _: None)
    msg = str(err.value)
    assert str(tiny.raw / NAMES[2]) in msg and str(src) in msg and data.MIRROR_ENV in msg
    # the files before it were valid and stay; the failed one left nothing, not even a temp file
    assert leftovers(tiny.raw) == sorted(NAMES[:2])


def test_corrupt_gz_does_not_hide_a_good_raw_file(tiny):
    fill_mirror(tiny)
    (tiny.mirror / (NAMES[0] + ".gz")).write_bytes(bad_copies(tiny.files[NAMES[0]])["corrupt_gz"])
    data.fetch("mnist", tiny.root, log=lambda _: None)
    assert (tiny.raw / NAMES[0]).read_bytes() == tiny.files[NAMES[0]]


@pytest.mark.parametrize("mirror_set", [True, False])
def test_missing_everywhere_names_the_mirror_variable(tiny, monkeypatch, mirror_set):
    if not mirror_set:
        monkeypatch.delenv(data.MIRROR_ENV)
    with pytest.raises(DataError) as err:
        data.fetch("mnist", tiny.root, log=lambda _: None)
    assert data.MIRROR_ENV in str(err.value) and str(tiny.raw / NAMES[0]) in str(err.value)
    assert leftovers(tiny.raw) == []


def test_existing_corrupt_target_is_fetched_again(tiny):
    fill_mirror(tiny)
    tiny.raw.mkdir(parents=True)
    target = tiny.raw / NAMES[1]
    target.write_bytes(flip(tiny.files[NAMES[1]], 20))
    logs = []
    data.fetch("mnist", tiny.root, log=logs.append)
    assert target.read_bytes() == tiny.files[NAMES[1]]
    assert f"corrupt {target}: fetching again" in logs


def test_failed_write_leaves_no_temp_file(tiny, monkeypatch):
    fill_mirror(tiny)

    def no_space(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(data.os, "replace", no_space)
    with pytest.raises(DataError, match="cannot write"):
        data.fetch("mnist", tiny.root, log=lambda _: None)
    assert leftovers(tiny.raw) == []


# ---------------------------------------------------------------- prepare / load_splits
def ids(x: torch.Tensor) -> list:
    return x[:, 0, 0].tolist()


def test_prepare_seeded_disjoint_splits(tiny):
    fill_mirror(tiny)
    data.fetch("mnist", tiny.root, log=lambda _: None)
    out = data.prepare("mnist", tiny.root, val_size=10, seed=0, log=lambda _: None)
    assert out == data.prepared_path(tiny.root, "mnist", 10, 0) and leftovers(out.parent) == ["mnist-val10-seed0.pt"]
    s = torch.load(out, weights_only=True)
    assert s["train_x"].dtype == torch.uint8 and s["train_x"].shape == (N_TRAIN - 10, SIDE, SIDE)
    assert len(s["val_x"]) == 10 and len(s["test_x"]) == N_TEST
    train_ids, val_ids = ids(s["train_x"]), ids(s["val_x"])
    assert not set(train_ids) & set(val_ids) and sorted(train_ids + val_ids) == list(range(N_TRAIN))
    for split in ("train", "val", "test"):  # labels travel with their images
        assert s[f"{split}_y"].tolist() == [i % 10 for i in ids(s[f"{split}_x"])]
    assert ids(s["test_x"]) == list(range(N_TEST))
    assert s["checksum"] == data.splits_checksum(s) and s["val_size"] == 10 and s["split_seed"] == 0

    again = torch.load(data.prepare("mnist", tiny.root, val_size=10, seed=0, log=lambda _: None), weights_only=True)
    assert torch.equal(again["train_x"], s["train_x"]) and torch.equal(again["val_y"], s["val_y"])
    other = torch.load(data.prepare("mnist", tiny.root, val_size=10, seed=1, log=lambda _: None), weights_only=True)
    assert set(ids(other["val_x"])) != set(val_ids) and other["checksum"] != s["checksum"]
    # each (val_size, seed) has its own file: preparing another split never rewrites this one
    assert leftovers(out.parent) == ["mnist-val10-seed0.pt", "mnist-val10-seed1.pt"]
    assert torch.equal(torch.load(out, weights_only=True)["val_x"], s["val_x"])


def test_prepare_refuses_corrupt_raw(tiny):
    fill_mirror(tiny)
    data.fetch("mnist", tiny.root, log=lambda _: None)
    (tiny.raw / NAMES[0]).write_bytes(flip(tiny.files[NAMES[0]], 30))
    with pytest.raises(DataError, match="corrupt"):
        data.prepare("mnist", tiny.root, val_size=10, log=lambda _: None)


def test_load_splits_fetches_prepares_and_rejects_bad_files(tiny):
    fill_mirror(tiny, gz=True)
    cfg = SimpleNamespace(name="mnist", root=str(tiny.root), val_size=10, split_seed=0)
    s = data.load_splits(cfg, log=lambda _: None)  # nothing local yet: fetch + prepare
    assert len(s["val_y"]) == 10
    cfg.val_size = 5
    assert len(data.load_splits(cfg, log=lambda _: None)["val_y"]) == 5  # its own file for the new size
    path = data.prepared_path(tiny.root, "mnist", 5, 0)
    good = path.read_bytes()
    altered = dict(torch.load(path, weights_only=True))
    altered["train_x"] = altered["train_x"].clone()
    altered["train_x"][3, 2, 2] ^= 0xFF  # one flipped pixel: loads fine, but is not the data it claims
    for content in (b"not a torch file" * 10, None, altered):
        if content is None:
            torch.save({"something": torch.zeros(1)}, path)  # loads, but is no split file
        elif isinstance(content, dict):
            torch.save(content, path)
        else:
            path.write_bytes(content)
        with pytest.raises(DataError) as err:
            data.load_splits(cfg, log=lambda _: None)
        msg = str(err.value)
        assert str(path) in msg and "Delete it" in msg and "\n" not in msg
    path.write_bytes(good)
    restored = data.load_splits(cfg, log=lambda _: None)  # the intact file loads again
    assert len(restored["val_y"]) == 5 and restored["checksum"] == data.splits_checksum(restored)


# ---------------------------------------------------------------- device batches
def test_device_data_batches():
    x = torch.arange(10 * 4, dtype=torch.uint8).reshape(10, 2, 2)
    y = torch.arange(10)
    d = DeviceData(x, y, torch.device("cpu"))
    assert len(d) == 10 and d.x.shape == (10, 1, 2, 2) and d.x.dtype == torch.float32
    torch.testing.assert_close(d.x[:, 0], (x.float() / 255 - data.MEAN) / data.STD)
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    got = list(d.shuffled_batches(4, perm))
    assert [len(b[1]) for b in got] == [4, 4, 2]
    assert torch.cat([b[1] for b in got]).tolist() == perm.tolist()
    for bx, by in got:
        assert torch.equal(bx, d.x[by])
    resumed = list(d.shuffled_batches(4, perm, start=1))  # from the second batch (resume mid-epoch)
    assert torch.cat([b[1] for b in resumed]).tolist() == perm[4:].tolist()
    assert torch.cat([b[1] for b in d.batches(3)]).tolist() == list(range(10))


# ---------------------------------------------------------------- the CLI
def test_cli_corrupt_prepared_file_is_one_line(tmp_path):
    root = tmp_path / "dataroot"
    bad = data.prepared_path(root, "mnist", 5000, 0)
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not a torch file" * 16)  # torch's own error for this spans several lines
    proc = run_script("train.py", f"data.root={root}", "trainer.device=cpu", "trainer.max_steps=1",
                      f"tracking.uri=sqlite:///{tmp_path / 'unused.db'}", cwd=tmp_path, timeout=300)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert str(bad) in lines[0] and "Delete it" in lines[0] and "dvc repro prepare" in lines[0]
