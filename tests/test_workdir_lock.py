"""One run per workdir (riformer_jax.train.workdir_lock): a live holder refuses a
second run by name, a dead one's lock is taken over, and the lock goes with its run."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from riformer_jax.train import faults, workdir_lock


def write_lock(workdir, **fields):
  now = time.time()
  record = {"host": socket.gethostname(), "pid": os.getpid(), "started": now - 60,
            "heartbeat": now, **fields}
  (workdir / workdir_lock.LOCK).write_text(json.dumps(record))
  return record


def test_a_live_holder_refuses_a_second_run_naming_itself(tmp_path):
  sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    write_lock(tmp_path, pid=sleeper.pid)
    with pytest.raises(faults.RunError) as refused:
      with workdir_lock.WorkdirLock(str(tmp_path)):
        pass
    message = str(refused.value)
    assert f"{tmp_path} is in use by another run (host {socket.gethostname()}, " \
        f"pid {sleeper.pid}, started " in message
    # The holder's lock is untouched.
    assert json.loads((tmp_path / workdir_lock.LOCK).read_text())["pid"] == sleeper.pid
  finally:
    sleeper.kill()
    sleeper.wait()
  # Its process gone, the same lock is stale on this host: taken over, said, released.
  said = []
  with workdir_lock.WorkdirLock(str(tmp_path), log=said.append):
    held = json.loads((tmp_path / workdir_lock.LOCK).read_text())
    assert held["pid"] == os.getpid()
  assert said and f"pid {sleeper.pid} on this host has ended" in said[0]
  assert not (tmp_path / workdir_lock.LOCK).exists()


def test_another_host_s_lock_holds_until_its_heartbeat_stops(tmp_path):
  write_lock(tmp_path, host="tpu-host-7", pid=1)
  with pytest.raises(faults.RunError, match="host tpu-host-7, pid 1"):
    with workdir_lock.WorkdirLock(str(tmp_path)):
      pass
  write_lock(tmp_path, host="tpu-host-7", pid=1,
             heartbeat=time.time() - workdir_lock.STALE_S - 1)
  said = []
  with workdir_lock.WorkdirLock(str(tmp_path), log=said.append):
    pass
  assert "no heartbeat for" in said[0] and not os.listdir(tmp_path)


def test_the_holder_keeps_its_heartbeat_fresh(tmp_path, monkeypatch):
  monkeypatch.setattr(workdir_lock, "HEARTBEAT_S", 0.05)
  with workdir_lock.WorkdirLock(str(tmp_path)):
    first = json.loads((tmp_path / workdir_lock.LOCK).read_text())["heartbeat"]
    time.sleep(0.3)
    later = json.loads((tmp_path / workdir_lock.LOCK).read_text())["heartbeat"]
  assert later > first


def test_a_takeover_never_removes_a_lock_another_contender_just_took(tmp_path,
                                                                     monkeypatch):
  """Two runs find the same stale lock; the other renames it aside and writes its own
  before this one's rename: this one must move the live lock back and be refused."""
  stale = write_lock(tmp_path, host="tpu-host-7", pid=1, heartbeat=0.0)
  live = write_lock(tmp_path, host="tpu-host-3", pid=2)  # the other contender's
  reads = []
  real_read = workdir_lock._read
  def read(path):  # this run's first look saw the stale lock, before the other's
    reads.append(path)
    return stale if len(reads) == 1 else real_read(path)
  monkeypatch.setattr(workdir_lock, "_read", read)
  with pytest.raises(faults.RunError, match="host tpu-host-3, pid 2"):
    with workdir_lock.WorkdirLock(str(tmp_path)):
      pass
  assert json.loads((tmp_path / workdir_lock.LOCK).read_text()) == live
  assert os.listdir(tmp_path) == [workdir_lock.LOCK]


def test_a_holder_whose_lock_was_taken_over_stops_its_heartbeat(tmp_path, monkeypatch):
  monkeypatch.setattr(workdir_lock, "HEARTBEAT_S", 0.05)
  said = []
  with workdir_lock.WorkdirLock(str(tmp_path), log=said.append):
    new_holder = write_lock(tmp_path, host="tpu-host-3", pid=2)  # a takeover
    time.sleep(0.3)
    assert json.loads((tmp_path / workdir_lock.LOCK).read_text()) == new_holder
  assert "was taken over by another run (host tpu-host-3, pid 2" in said[0]
  assert (tmp_path / workdir_lock.LOCK).exists()  # the new holder's, left alone
