"""One process per run dir: a second one is refused and writes nothing; a dead holder's lock is
taken over; a released lock leaves nothing behind."""

import json
import os
import socket

import pytest

from qat.errors import RunDirError
from qat.lock import LOCK_NAME, run_lock
from tests.conftest import run_cli

TINY = ["data=synthetic", "data.image_size=8", "data.train_examples=64", "data.val_examples=32",
        "model.width=4", "trainer.epochs=1", "trainer.batch_size=32", "trainer.verbose=0"]


def _snapshot(root):
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*")}


def test_lock_is_exclusive_names_its_holder_and_leaves_nothing(tmp_path):
    run = tmp_path / "a" / "run"
    with run_lock(str(run), "first"):
        holder = json.loads((run / LOCK_NAME).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(RunDirError, match=rf"in use by another qat process \(pid "
                                              rf"{os.getpid()} on .*running first\)"), \
                run_lock(str(run)):
            pass
        assert (run / LOCK_NAME).exists()  # the refused attempt did not remove the holder's
    assert not (tmp_path / "a").exists()  # created for the lock, left empty: removed
    (run / "kept").mkdir(parents=True)
    with run_lock(str(run)):
        pass
    assert sorted(os.listdir(run)) == ["kept"]  # released, file gone, the dir stays


@pytest.mark.slow
def test_second_process_on_a_locked_run_dir_is_refused_and_writes_nothing(tmp_path):
    run = tmp_path / "run"
    (run / "float").mkdir(parents=True)
    (run / "float" / "note.txt").write_text("an earlier phase's file")
    with run_lock(str(run), "the first run"):
        before = _snapshot(run)
        proc = run_cli("qat.train", "phase=float", *TINY, f"run.dir={run}")
        assert _snapshot(run) == before
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("qat: error: ") and f"pid {os.getpid()}" in last
    assert "running the first run" in last and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_lock_left_by_a_dead_process_is_taken_over_with_a_warning(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    dead = {"pid": 4194303, "host": "gone-host", "command": "qat.train", "started": "yesterday"}
    (run / LOCK_NAME).write_text(json.dumps(dead))  # its flock died with its process
    proc = run_cli("qat.train", "phase=float", *TINY, f"run.dir={run}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "taking over a lock its holder left (pid 4194303 on gone-host" in proc.stdout  # log
    assert (run / "float" / "metrics.json").is_file() and not (run / LOCK_NAME).exists()
