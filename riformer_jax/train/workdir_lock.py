"""One run per workdir: WORKDIR/run.lock names the run that holds it.

Two `train.py` processes on one workdir would interleave their checkpoints and
metrics. The first takes the lock; a second is refused at start-up with the holder's
host, pid and start time. The lock is a file holding those facts, created with
O_EXCL, and a heartbeat: the holder rewrites its time every `HEARTBEAT_S` from a
daemon thread. `fcntl` locks would vanish with a dead holder by themselves, but they
do not hold across hosts on NFS-like or bucket-backed (gcsfuse) filesystems, where
pod-slice workdirs live; a file with a heartbeat works on all of them.

A lock is stale, and taken over with a message, when its holder ran on this host and
that pid is gone, or when its heartbeat is older than `STALE_S` (a holder on another
host that was killed). Take-over renames the stale file aside first, which only one
contender can do, checks that what it moved is the lock it judged stale (else puts it
back), then creates a fresh one; a holder whose lock was taken over stops its
heartbeat instead of writing over the new one. A multi-host run holds one lock, taken
by process 0; every process learns whether it got it.
"""

import datetime
import json
import os
import socket
import threading
import time

import jax
from jax.experimental import multihost_utils

from riformer_jax.train import faults

LOCK = "run.lock"
HEARTBEAT_S = 30.0
STALE_S = 300.0  # ten missed heartbeats


def _read(path):
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None  # gone, or half-written by a holder that died while creating it


def _pid_alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's live process
    return True
  return True


def _stale(holder, now):
  """Why `holder` no longer holds the lock, or None if it does."""
  if holder is None:
    return "an unreadable lock file"
  age = now - holder.get("heartbeat", 0)
  if holder.get("host") == socket.gethostname() and not _pid_alive(holder.get("pid", -1)):
    return f"pid {holder.get('pid')} on this host has ended"
  if age > STALE_S:
    return f"no heartbeat for {age:.0f} s"
  return None


def _describe(holder):
  started = datetime.datetime.fromtimestamp(holder["started"]).isoformat(" ", "seconds")
  return f"host {holder['host']}, pid {holder['pid']}, started {started}"


class WorkdirLock:
  """Holds WORKDIR/run.lock while in use: `with WorkdirLock(workdir, log): ...`."""

  def __init__(self, workdir, log=print):
    self.path = os.path.join(workdir, LOCK)
    self.log = log
    self.record = None
    self._stop = threading.Event()
    self._thread = None

  def __enter__(self):
    message = self._acquire() if jax.process_index() == 0 else ""
    if jax.process_count() > 1:  # every process stops if process 0 was refused
      refused = multihost_utils.broadcast_one_to_all(int(bool(message)))
      message = message or ("process 0 could not take the workdir's lock"
                            if refused else "")
    if message:
      raise faults.RunError(message)
    return self

  def _acquire(self):
    """'' when held, else why not."""
    now = time.time()
    self.record = dict(host=socket.gethostname(), pid=os.getpid(), started=now,
                       heartbeat=now)
    for _ in range(3):  # a contender may take over between our reads
      try:
        handle = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        holder = _read(self.path)
        reason = _stale(holder, time.time())
        if reason is None:
          return (f"{os.path.dirname(self.path)} is in use by another run ("
                  f"{_describe(holder)}): wait for it, stop it, or choose another "
                  f"--workdir (a lock left by a killed run on another host is taken "
                  f"over after {STALE_S:.0f} s without heartbeat)")
        aside = f"{self.path}.stale-{os.getpid()}"
        try:
          os.rename(self.path, aside)  # only one contender moves this file
        except FileNotFoundError:
          continue
        if _read(aside) != holder:
          # Another contender took over between our read and our rename: what we
          # moved is its live lock. Put it back (unless a third has made one since).
          try:
            os.link(aside, self.path)
          except FileExistsError:
            pass
          os.remove(aside)
          continue
        os.remove(aside)
        self.log(f"took over the lock of a run that stopped ({reason}): "
                 f"{_describe(holder) if holder else self.path}")
        continue
      with os.fdopen(handle, "w") as f:
        json.dump(self.record, f)
      self._thread = threading.Thread(target=self._beat, daemon=True)
      self._thread.start()
      return ""
    return f"{self.path}: could not take the lock (other runs keep taking it)"

  def _beat(self):
    while not self._stop.wait(HEARTBEAT_S):
      holder = _read(self.path)
      if holder is not None and not self._is_mine(holder):
        # Taken over while this process stalled past STALE_S: never write over the
        # new holder's lock.
        self.log(f"warning: {self.path} was taken over by another run "
                 f"({_describe(holder)}); this run no longer holds the workdir")
        return
      self.record["heartbeat"] = time.time()
      staging = f"{self.path}.{os.getpid()}"
      try:
        with open(staging, "w") as f:
          json.dump(self.record, f)
        os.replace(staging, self.path)
      except OSError:  # a full disk must not kill the run over its heartbeat
        pass

  def __exit__(self, *exc):
    if self._thread is None:
      return
    self._stop.set()
    self._thread.join()
    holder = _read(self.path)
    if holder and self._is_mine(holder):
      os.remove(self.path)

  def _is_mine(self, holder):
    return all(holder.get(k) == self.record[k] for k in ("host", "pid", "started"))
