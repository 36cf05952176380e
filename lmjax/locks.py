"""Exclusive locks on a directory: a training run's workdir, a tfds corpus being built.

Local disks: an exclusive `flock(2)` on `DIR/NAME`, held as long as the process
lives. The kernel drops it when the holder exits, however it exits (kill -9
included), so a lock file left by a dead process is simply taken again: on a
local disk no lock is ever stale. The file records the holder (host, pid,
start time) for the message that refuses a second run.

Object stores (`gs://...`) have no flock. There the lock is an object
`DIR/NAME` with the same record plus a heartbeat that a daemon thread rewrites
every `heartbeat_s` seconds. **Stale-lock rule:** a lock object whose heartbeat
is older than `stale_s` seconds (default 10 minutes: its holder died, or lost
its connection) is taken over, with a warning naming the old holder. A taker
writes its record, waits `settle_s` seconds and reads the object back: if
another taker wrote in between, the later writer holds the lock and the
earlier one is refused (object stores offer no compare-and-swap through
tf.io.gfile; the wait makes the window small, not zero).
"""

import datetime
import json
import os
import socket
import sys
import threading
import time

from lmjax import fs


class LockError(RuntimeError):
  """The directory is held by another process."""


def _record() -> dict:
  now = time.time()
  return {
    'host': socket.gethostname(),
    'pid': os.getpid(),
    'started': now,
    'heartbeat': now,
    'command': ' '.join(sys.argv[:3]),
  }


def describe_holder(record: dict) -> str:
  started = record.get('started')
  when = (
    datetime.datetime.fromtimestamp(started).strftime('%Y-%m-%d %H:%M:%S')
    if isinstance(started, (int, float))
    else 'an unknown time'
  )
  return f'process {record.get("pid", "?")} on host {record.get("host", "?")}, started {when}'


def _same_holder(a: dict, b: dict) -> bool:
  return all(a.get(k) == b.get(k) for k in ('host', 'pid', 'started'))


def _parse(text: str) -> dict:
  try:
    record = json.loads(text)
  except ValueError:
    return {}
  return record if isinstance(record, dict) else {}


class Lock:
  """An exclusive lock on `directory` (the file or object `directory/name`).

  `acquire()` raises LockError naming the holder, or with `wait` waits for it
  (saying so once on stderr). Use as a context manager, or `acquire()` and
  `release()`; a process that ends releases a local lock by itself."""

  def __init__(
    self,
    directory: str,
    name: str = 'lock',
    what: str = 'a run',
    wait: bool = False,
    heartbeat_s: float = 60.0,
    stale_s: float = 600.0,
    settle_s: float = 2.0,
  ):
    self.directory, self.what, self.wait = directory, what, wait
    self.path = os.path.join(directory, name)
    self.remote = '://' in directory
    self.heartbeat_s, self.stale_s, self.settle_s = heartbeat_s, stale_s, settle_s
    self._file = None
    self._record = None
    self._stop = threading.Event()

  def __enter__(self):
    self.acquire()
    return self

  def __exit__(self, *exc_info):
    self.release()

  def refusal(self, holder: dict) -> str:
    stale = (
      f' (if it died, its lock is taken over once its heartbeat is {self.stale_s:.0f}s old)'
      if self.remote
      else ''
    )
    return (
      f'{self.directory} is in use by {self.what}: {describe_holder(holder)} holds the '
      f'lock {self.path}{stale}. Wait for it to end or stop it, or use another directory.'
    )

  def acquire(self, poll_s: float = 1.0) -> None:
    told = False
    while True:
      holder = self._try_remote() if self.remote else self._try_local()
      if holder is None:
        return
      if not self.wait:
        raise LockError(self.refusal(holder))
      if not told:
        print(
          f'waiting for {describe_holder(holder)}, which holds {self.path} ({self.what})',
          file=sys.stderr,
          flush=True,
        )
        told = True
      time.sleep(poll_s)

  def _try_local(self) -> dict | None:
    """None once locked; else the holder's record."""
    import fcntl  # POSIX only, like flock itself

    fs.makedirs(self.directory)
    handle = open(self.path, 'a+', encoding='utf-8')
    try:
      fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      handle.seek(0)
      holder = _parse(handle.read())
      handle.close()
      return holder
    handle.seek(0)
    handle.truncate()
    self._record = _record()
    handle.write(json.dumps(self._record))
    handle.flush()
    self._file = handle
    return None

  def _read_remote(self) -> dict | None:
    try:
      with fs.tensorflow().io.gfile.GFile(self.path, 'r') as f:
        return _parse(f.read())
    except fs.tensorflow().errors.NotFoundError:
      return None

  def _write_remote(self, record: dict) -> None:
    """Written whole under another name, then renamed: a reader never sees half a record."""
    staging = f'{self.path}.{record["host"]}.{record["pid"]}.tmp'
    with fs.tensorflow().io.gfile.GFile(staging, 'w') as f:
      f.write(json.dumps(record))
    fs.tensorflow().io.gfile.rename(staging, self.path, overwrite=True)

  def _try_remote(self) -> dict | None:
    fs.tensorflow().io.gfile.makedirs(self.directory)
    holder = self._read_remote()
    if holder and time.time() - float(holder.get('heartbeat', 0)) < self.stale_s:
      return holder
    if holder:
      print(
        f'warning: taking over the stale lock {self.path} of {describe_holder(holder)} '
        f'(no heartbeat for over {self.stale_s:.0f}s)',
        file=sys.stderr,
      )
    mine = _record()
    self._write_remote(mine)
    time.sleep(self.settle_s)
    now = self._read_remote() or {}
    if not _same_holder(now, mine):
      return now  # another taker wrote after us: theirs
    self._record = mine
    self._stop.clear()
    threading.Thread(target=self._beat, daemon=True, name='lmjax-lock-heartbeat').start()
    return None

  def _beat(self) -> None:
    while not self._stop.wait(self.heartbeat_s):
      try:
        self._record = {**self._record, 'heartbeat': time.time()}
        self._write_remote(self._record)
      except fs.tensorflow().errors.OpError as error:  # a passing outage: the next beat tries again
        print(f'warning: could not refresh the lock {self.path}: {error}', file=sys.stderr)

  def release(self) -> None:
    if self._file is not None:
      import fcntl

      fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
      self._file.close()
      self._file = None
    elif self._record is not None and self.remote:
      self._stop.set()
      if _same_holder(self._read_remote() or {}, self._record):
        fs.tensorflow().io.gfile.remove(self.path)
    self._record = None
