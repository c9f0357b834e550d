"""gradlab tried the way a hostile tester would: malicious and damaged checkpoints, resume that must
not change the experiment, concurrent processes on a new store, kill -9 and SIGTERM, a full
disk, silent corruption, unreachable or read-only stores, and the inputs that used to end in a
traceback. Each case is one of the findings of issue 9; the fast ones run by default."""
from __future__ import annotations

import io
import math
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from conftest import PYTHON, ROOT, SRC, cli, cli_env, client, history, one_line_error, store_uri, tiny_overrides
from gradlab import checkpoint
from gradlab.errors import DataError
from gradlab.training import train

FAST = ["model.hidden_sizes=[32]", "trainer.batch_size=32", "data.synthetic_size=512"]


def runs_of(uri, experiment="gradlab"):
    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    return c.search_runs([exp.experiment_id]) if exp else []


def steps_of(uri, run_id, key="grad/norm"):
    return [s for s, _ in history(uri, run_id, key)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 20-step stabilizer=clip run (sgd at lr 0.5: the clip fires) and its checkpoint."""
    tmp = tmp_path_factory.mktemp("trained")
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        from conftest import compose

        cfg = compose(tiny_overrides(tmp, "stabilizer=clip", "optimizer=sgd", "optimizer.lr=0.5", steps=20))
        result = train(cfg, tmp / "out")
    finally:
        os.chdir(cwd)
    return result


# ---------------------------------------------------------------- 1. code execution from a checkpoint
class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def evil_files(tmp_path):
    """An old-style pickle with a __reduce__ payload, and one hidden inside a valid wrapper whose
    checksum matches (so only weights_only stands between the file and the payload)."""
    marker = tmp_path / "pwned"
    outer = tmp_path / "evil.pt"
    torch.save({"model": Payload(marker)}, outer)
    buf = io.BytesIO()
    torch.save({"config": Payload(marker)}, buf)
    import hashlib

    inner = tmp_path / "evil_inner.pt"
    torch.save({"format": checkpoint.FORMAT, "sha256": hashlib.sha256(buf.getvalue()).hexdigest(),
                "payload": torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)}, inner)
    return marker, [outer, inner]


def test_malicious_checkpoint_never_executes(tmp_path):
    marker, files = evil_files(tmp_path)
    uri = store_uri(tmp_path / "store")
    for evil in files:
        line = one_line_error(cli("evaluate.py", f"checkpoint={evil}", "device=cpu"), 1, str(evil))
        assert "not a readable checkpoint" in line
        one_line_error(cli("train.py", *tiny_overrides(tmp_path, f"trainer.resume={evil}"), f"tracking.uri={uri}"),
                       1, str(evil))
    assert not marker.exists()  # the payload never ran


def test_damaged_and_foreign_checkpoints_are_one_line(tmp_path, trained):
    good = trained.checkpoint.read_bytes()
    cases = {"random": os.urandom(4096), "truncated": good[: len(good) // 2], "empty": b""}
    flipped = bytearray(good)
    for i in range(64):  # 64 bytes flipped inside the payload: still a valid zip, different numbers
        flipped[len(good) // 2 + 97 * i] ^= 0xFF
    cases["flipped"] = bytes(flipped)
    torch.save([1, 2, 3], tmp_path / "list.pt")
    cases["not_a_dict"] = (tmp_path / "list.pt").read_bytes()
    torch.save({"model": {"w": torch.zeros(2)}}, tmp_path / "old.pt")  # a plain state dict, not gradlab's
    cases["foreign"] = (tmp_path / "old.pt").read_bytes()
    for name, content in cases.items():
        path = tmp_path / f"{name}.pt"
        path.write_bytes(content)
        with pytest.raises(DataError) as err:
            checkpoint.load(path, torch.device("cpu"), "checkpoint")
        assert str(path) in str(err.value) and "\n" not in str(err.value), name
    # through the CLI: one line, exit 1, for evaluate and for resume
    one_line_error(cli("evaluate.py", f"checkpoint={tmp_path / 'flipped.pt'}", "device=cpu"), 1, "checksum")
    one_line_error(cli("train.py", *tiny_overrides(tmp_path, f"trainer.resume={tmp_path / 'truncated.pt'}")), 1,
                   "truncated.pt")


# ---------------------------------------------------------------- 1b. resume keeps the experiment
def test_resume_keeps_the_stabilizers_and_refuses_to_change_the_experiment(tmp_path, trained):
    """The README's form `trainer.resume=<ckpt> trainer.max_steps=N`, without repeating stabilizer=clip:
    the continuation clips (it once continued unclipped under a stabilizer=clip tag)."""
    ckpt = trained.checkpoint
    out = tmp_path / "more.pt"
    rc, _, err = cli("train.py", f"trainer.resume={ckpt}", "trainer.max_steps=40", f"trainer.checkpoint={out}",
                     "trainer.progress=false", "telemetry.plots=false")
    assert rc == 0, err[-3000:]
    uri = trained.tracking_uri
    new = [r for r in runs_of(uri) if r.info.run_id != trained.run_id]
    assert len(new) == 1
    run = new[0]
    assert run.data.tags["stabilizer"] == "clip" and run.data.tags["resumed_from"] == trained.run_id
    assert run.data.tags["resume/changed"] == "trainer.max_steps: 20 -> 40"
    post = dict(history(uri, run.info.run_id, "grad/norm_after"))
    pre = dict(history(uri, run.info.run_id, "grad/norm"))
    assert sorted(post) == list(range(40))  # the whole history: 20 replayed, 20 trained
    assert all(post[s] <= 1.0 + 1e-6 for s in post) and any(pre[s] > 1.0 for s in range(20, 40))
    # the finished run is left as it was: 20 points, one summary, one final validation
    assert steps_of(uri, trained.run_id) == list(range(20))
    assert len(history(uri, trained.run_id, "clip_rate")) == 1
    # epoch ends 16 (replayed) and 32, then the final partial epoch; not the old run's final validation at 20
    assert [s for s, _ in history(uri, run.info.run_id, "val/accuracy")] == [16, 32, 40]
    # a key that would change the experiment is refused before anything runs
    line = one_line_error(cli("train.py", f"trainer.resume={ckpt}", "stabilizer=none", "trainer.max_steps=40"), 2,
                          "'stabilizer.clip")
    assert "resumed run continues" in line
    one_line_error(cli("train.py", f"trainer.resume={ckpt}", "optimizer.lr=0.1"), 2, "'optimizer.lr'")
    one_line_error(cli("train.py", f"trainer.resume={ckpt}", "model=cnn"), 2, "'model.")


def test_resume_into_another_store_and_evaluate_a_run_the_store_lacks(tmp_path, trained):
    """A checkpoint whose run lives in another store: resuming there starts a new run that holds the
    whole history (it once died with MLflow's RESOURCE_DOES_NOT_EXIST traceback); evaluating it
    against a store without the run is one line."""
    other = store_uri(tmp_path / "other")
    rc, _, err = cli("train.py", f"trainer.resume={trained.checkpoint}", "trainer.max_steps=24", f"tracking.uri={other}",
                     f"trainer.checkpoint={tmp_path / 'c.pt'}", "trainer.progress=false", "telemetry.plots=false")
    assert rc == 0, err[-3000:]
    (run,) = runs_of(other)
    assert run.data.tags["resumed_from"] == trained.run_id and steps_of(other, run.info.run_id) == list(range(24))
    one_line_error(cli("evaluate.py", f"checkpoint={trained.checkpoint}", f"tracking_uri={other}", "device=cpu"), 2,
                   trained.run_id, "tracking_uri")


# ---------------------------------------------------------------- 2. independent processes on a new store
WRITER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {src!r})
    from gradlab.tracking import RunLogger
    run = RunLogger.start(sys.argv[1], "gradlab", "writer-" + sys.argv[2], {{"seed": sys.argv[2]}})
    run.log_points([("grad/norm", float(s), s) for s in range(int(sys.argv[3]))], 0)
    run.close()
""")


def start_together(commands, env=None):
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env or cli_env())
             for c in commands]
    return [(p.wait(timeout=600), p.stdout.read(), p.stderr.read()) for p in procs]


def test_processes_started_together_on_a_new_sqlite_store(tmp_path):
    """Without the store lock, MLflow's schema migration races (`table _alembic_tmp_tags already
    exists`) and most processes die, some leaving the store broken for good."""
    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(src=str(SRC)))
    uri = f"sqlite:///{tmp_path / 'new.db'}"
    results = start_together([[PYTHON, str(script), uri, str(i), "1200"] for i in range(4)])
    assert all(rc == 0 for rc, _, _ in results), [e[-2000:] for rc, _, e in results if rc]
    runs = runs_of(uri)
    assert len(runs) == 4
    for run in runs:  # every point, in two log_batch chunks
        assert steps_of(uri, run.info.run_id) == list(range(1200))


@pytest.mark.slow
def test_eight_training_processes_on_a_new_sqlite_store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'new.db'}"
    commands = [[PYTHON, str(SRC / "train.py"), *tiny_overrides(tmp_path, f"seed={i}", f"tracking.uri={uri}",
                                                                 f"trainer.checkpoint={tmp_path / f'm{i}.pt'}", steps=30)]
                for i in range(8)]
    results = start_together(commands)
    assert all(rc == 0 for rc, _, _ in results), [e[-2000:] for rc, _, e in results if rc]
    runs = runs_of(uri)
    assert len(runs) == 8 and {r.info.status for r in runs} == {"FINISHED"}
    for run in runs:
        assert steps_of(uri, run.info.run_id) == list(range(30))


def test_two_runs_logging_the_same_new_dataset_at_once(tmp_path):
    """MLflow's SQL store looks a dataset up and then inserts it: a run that loses that race gets a
    unique-key error (PostgreSQL's "duplicate key ... dataset_pk", seen in CI with 8 processes on an
    MLflow server). The loser must still be linked to the dataset, not crash; other errors still raise."""
    from mlflow.exceptions import MlflowException
    from gradlab.tracking import RunLogger

    uri = store_uri(tmp_path)
    first = RunLogger.start(uri, "gradlab", "first", {})
    first.log_dataset("mnist", "abc123", "here", {"train": 10})
    second = RunLogger.start(uri, "gradlab", "second", {})
    real, calls = second.client.log_inputs, []

    def lost_the_race(run_id, datasets):  # what the loser sees: the winner committed between lookup and insert
        calls.append(run_id)
        if len(calls) == 1:
            raise MlflowException('BAD_REQUEST: (psycopg.errors.UniqueViolation) duplicate key value violates '
                                  'unique constraint "dataset_pk"')
        return real(run_id, datasets)

    second.client.log_inputs = lost_the_race
    second.log_dataset("mnist", "abc123", "here", {"train": 10})
    for run in (first, second):
        run.close()
    linked = [r.inputs.dataset_inputs for r in (client(uri).get_run(first.run_id), client(uri).get_run(second.run_id))]
    assert len(calls) == 2 and [[d.dataset.digest for d in inputs] for inputs in linked] == [["abc123"], ["abc123"]]

    third = RunLogger.start(uri, "gradlab", "third", {})
    third.client.log_inputs = lambda *a: (_ for _ in ()).throw(MlflowException("RESOURCE_DOES_NOT_EXIST: no run"))
    with pytest.raises(MlflowException, match="no run"):
        third.log_dataset("mnist", "abc123", "here", {"train": 10})
    third.close()


# ---------------------------------------------------------------- 3. kill -9, SIGTERM
LONG = ["trainer.epochs=400", "trainer.checkpoint_every=100", "telemetry.log_every=25"]


def long_overrides(tmp_path, steps):
    return tiny_overrides(tmp_path, *LONG, f"trainer.checkpoint={tmp_path / 'ck' / 'model.pt'}", steps=steps)


def start_training(tmp_path, steps):
    return subprocess.Popen([PYTHON, str(SRC / "train.py"), *long_overrides(tmp_path, steps)], cwd=tmp_path,
                            env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, proc, timeout=120):
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() - t0 < timeout
        time.sleep(0.05)


def test_kill_9_then_resume_auto_is_the_uninterrupted_run(tmp_path):
    n = 1500
    proc = start_training(tmp_path, n)
    wait_for(tmp_path / "ck" / "model.pt", proc)
    time.sleep(random.uniform(0.0, 0.8))  # somewhere after the first checkpoint
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed: make it longer"
    uri = store_uri(tmp_path / "store")
    killed = runs_of(uri)[0]
    assert killed.info.status == "RUNNING"  # nobody could close it ...
    killed_steps = steps_of(uri, killed.info.run_id)
    assert killed_steps and killed_steps[-1] < n - 1
    rc, _, err = cli("train.py", *long_overrides(tmp_path, n), "trainer.resume=auto", cwd=tmp_path)
    assert rc == 0, err[-3000:]
    runs = runs_of(uri)
    assert len(runs) == 1 and runs[0].info.run_id == killed.info.run_id  # ... the same run, continued
    run = client(uri).get_run(killed.info.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["resume/count"] == "1"
    assert "process was gone" in run.data.tags["gradlab.closed"]
    straight_dir = tmp_path / "straight"
    from conftest import compose

    straight = train(compose(long_overrides(straight_dir, n)), straight_dir / "out")
    for key in ("train/loss", "grad/norm", "grad/norm_after", "lr", "val/accuracy", "grad/layer/head"):
        a = history(straight.tracking_uri, straight.run_id, key)
        b = history(uri, run.info.run_id, key)
        assert [s for s, _ in a] == [s for s, _ in b], key  # one point per step: none missing, none twice
        assert a == b, key  # and bit-for-bit the same values


def test_sigterm_leaves_a_killed_run_with_every_point(tmp_path):
    proc = start_training(tmp_path, 20000)
    wait_for(tmp_path / "ck" / "model.pt", proc)
    time.sleep(random.uniform(0.0, 0.5))
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "Traceback" not in out + err and "stopped by SIGTERM" in out + err  # Hydra's log goes to stdout
    uri = store_uri(tmp_path / "store")
    run = runs_of(uri)[0]
    assert run.info.status == "KILLED"
    stopped = int(run.data.tags["gradlab.stopped"].split()[-1])
    for key in ("grad/norm", "train/loss", "lr"):
        assert steps_of(uri, run.info.run_id, key) == list(range(stopped)), key
    state = checkpoint.load(tmp_path / "ck" / "model.pt", torch.device("cpu"), "checkpoint")
    assert state["step"] == stopped and state["engine"]["step"] == stopped


# ---------------------------------------------------------------- 4. a full disk
def tmpfs(mount: Path, options: str, why: str) -> Path:
    """A tmpfs mounted at ``mount`` with ``options``; the test is skipped (``why``) where it cannot be."""
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip(why)
    return mount


@pytest.fixture
def full_disk(tmp_path):
    mount = tmpfs(tmp_path / "small", "size=64k", "needs root to mount a small tmpfs (a full disk on demand)")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_full_disk_is_one_line_no_partial_file_and_a_readable_store(tmp_path, full_disk):
    uri = store_uri(tmp_path / "store")
    ckpt = full_disk / "model.pt"  # a tiny MLP's checkpoint (~0.4 MB) does not fit in 64 kB
    result = cli("train.py", *tiny_overrides(tmp_path, f"trainer.checkpoint={ckpt}", "trainer.checkpoint_every=10",
                                             steps=30), f"tracking.uri={uri}")
    one_line_error(result, 1, str(ckpt), "No space left on device")
    assert list(full_disk.iterdir()) == []  # no half-written file
    run = runs_of(uri)[0]  # the store is readable, and holds what was logged before the failure
    assert run.info.status == "FAILED"
    assert steps_of(uri, run.info.run_id)[:10] == list(range(10))


# ---------------------------------------------------------------- 6. silent corruption
def test_data_checksum_is_the_content_actually_used(tmp_path):
    from gradlab import data

    uri = store_uri(tmp_path / "store")
    mirror = os.environ.get("GRADLAB_DATA_MIRROR")
    if not mirror:
        pytest.skip("set GRADLAB_DATA_MIRROR to the MNIST IDX files")
    root = tmp_path / "data"
    data.fetch("mnist", root, log=lambda _: None)
    path = data.prepare("mnist", root, 5000, 0, log=lambda _: None)
    splits = torch.load(path, weights_only=True)
    splits["train_x"] = splits["train_x"].clone()
    splits["train_x"].view(-1)[:4096] ^= 0x5A  # 4096 flipped bytes, in a file that still loads
    torch.save(splits, path)
    one_line_error(cli("train.py", f"data.root={root}", f"tracking.uri={uri}", "trainer.max_steps=1",
                       "trainer.device=cpu"), 1, str(path), "does not match its checksum")


# ---------------------------------------------------------------- 7, 8, 9. one line instead of a traceback or a stall
def test_inputs_that_used_to_end_in_a_traceback(tmp_path, trained):
    one_line_error(cli("evaluate.py", f"checkpoint={trained.checkpoint}", "batch_size=0"), 2, "'batch_size'")
    one_line_error(cli("evaluate.py", f"checkpoint={trained.checkpoint}", "device=tpu"), 2, "'device'")
    ro = tmp_path / "ro"
    ro.mkdir()
    blocked = ro / "file"
    blocked.write_text("a file where a directory should be")
    one_line_error(cli("evaluate.py", f"checkpoint={trained.checkpoint}", f"metrics_file={blocked}/m.json",
                       "device=cpu"), 1, str(blocked))
    proc = subprocess.run([PYTHON, str(ROOT / "pipelines" / "prepare.py"), "nope"], cwd=tmp_path, env=cli_env(),
                          capture_output=True, text=True, timeout=120)
    one_line_error((proc.returncode, proc.stdout, proc.stderr), 1, "nope")
    import runpy

    argv = sys.argv
    sys.argv = ["search.py", "--trials", "1", "--param", "optimizer.lr=loguniform:1e-3:1e-1", "--storage",
                "bogus://x", "--", "data=synthetic"]
    try:
        from conftest import capture

        result = capture(lambda: runpy.run_path(str(ROOT / "pipelines" / "search.py"), run_name="__main__"))
    finally:
        sys.argv = argv
    one_line_error(result, 2, "--storage bogus://x")


def test_unreachable_or_unwritable_stores_fail_fast(tmp_path):
    t0 = time.perf_counter()
    one_line_error(cli("train.py", *tiny_overrides(tmp_path), "tracking.uri=http://127.0.0.1:9/"), 1,
                   "http://127.0.0.1:9/", "not reachable")
    assert time.perf_counter() - t0 < 15
    one_line_error(cli("train.py", *tiny_overrides(tmp_path), "tracking.uri=sqlite:////nonexistent/dir/x.db"), 1,
                   "/nonexistent/dir")
    assert not Path("/nonexistent").exists()  # no directories created at the filesystem root


def test_read_only_store_is_one_line(tmp_path):
    mount = tmpfs(tmp_path / "ro", "size=1m,ro",
                  "needs root to mount a read-only tmpfs (root ignores file permissions)")
    try:
        t0 = time.perf_counter()
        one_line_error(cli("train.py", *tiny_overrides(tmp_path), f"tracking.uri=sqlite:///{mount}/x.db"), 1,
                       "read-only")
        assert time.perf_counter() - t0 < 15
    finally:
        subprocess.run(["umount", str(mount)], check=False)


# ---------------------------------------------------------------- 10. reproducibility conditions
@pytest.mark.slow  # the default suite's time budget (README: Tests)
def test_same_thread_setting_reproduces_bit_for_bit_whatever_the_machine_default(tmp_path):
    """trainer.threads pins torch's intra-op threads: a process whose default is 2 threads
    (OMP_NUM_THREADS=2) and this one (1 thread, see conftest) give the same numbers, and the run
    records what decided them."""
    uri = store_uri(tmp_path / "store")

    def overrides(name):
        return [*tiny_overrides(tmp_path / name, "trainer.threads=2", "trainer.deterministic=true", steps=16),
                f"tracking.uri={uri}", f"tracking.run_name={name}"]

    proc = subprocess.run([PYTHON, str(SRC / "train.py"), *overrides("a")], env=cli_env(OMP_NUM_THREADS="2"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    try:
        assert cli("train.py", *overrides("b"))[0] == 0
    finally:
        torch.set_num_threads(1)  # conftest's setting for the rest of the suite
    a, b = sorted(runs_of(uri), key=lambda r: r.info.run_name)
    for run in (a, b):
        assert run.data.tags["threads"] == "2" and run.data.tags["torch_version"] == torch.__version__
        assert run.data.tags["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    for key in ("train/loss", "grad/norm"):
        assert history(uri, a.info.run_id, key) == history(uri, b.info.run_id, key), key
        assert all(math.isfinite(v) for _, v in history(uri, a.info.run_id, key))
