"""RunLock names its holder even when a second process arrives while the holder is still writing its name."""

from __future__ import annotations

import fcntl
import threading
import time

import pytest

from collapse_guard.rundir import LOCK_NAME, RunFolderError, RunLock


def test_refused_run_names_holder_that_writes_late(tmp_path):
    # Take the lock the way RunLock does, but write the holder's name only after a delay: the window in
    # which a concurrent start used to be told "in use by another process".
    fh = open(tmp_path / LOCK_NAME, "a+")  # noqa: SIM115
    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def write_late() -> None:
        time.sleep(0.3)
        fh.write("pid 4242 on host since now (collapse-guard run x.yaml)")
        fh.flush()

    writer = threading.Thread(target=write_late)
    writer.start()
    with pytest.raises(RunFolderError, match="in use by pid 4242 on host"), RunLock(tmp_path):
        pass
    writer.join()
    fcntl.flock(fh, fcntl.LOCK_UN)
    fh.close()
    with RunLock(tmp_path) as lock:  # free again: the next run takes it and writes its own name
        assert (tmp_path / LOCK_NAME).read_text().startswith("pid ")
    assert lock._fh is None
