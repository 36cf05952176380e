"""Bounds on a stuck run: a phase that takes too long, and a SIGTERM that is not obeyed.

A collective whose peer never arrives (a device program stuck in a
multi-process run, a lost host) blocks the main thread inside XLA. No Python
code runs there, so the train loop's own checks (the preemption flag, metrics)
are never reached, and the run would wait forever. A daemon thread watches
two things instead, and ends the process with one clear error line:

- each phase of the loop (`train step`, `evaluation`, `save`, ...) opened
  with `phase(name, step)` must make progress within its timeout: it ends,
  or calls `beat()` (evaluation does once per batch, so a long split is
  not a hang);
- after a SIGTERM, the process must end within `sigterm_grace_s` (the train
  loop saves and exits at the next step; a stuck one never gets there). The
  signal reaches this thread through `signal.set_wakeup_fd`, which Python's
  C-level handler writes to even while the main thread is blocked in C++.

The thread needs the GIL, which JAX releases while it waits on devices.
"""

import contextlib
import os
import select
import signal
import sys
import threading
import time

HUNG_EXIT_CODE = 1
_active = None  # the watchdog of the run in this process, for `beat`


def beat() -> None:
  """Progress within the current phase: its deadline starts again."""
  if _active is not None:
    _active.beat()


class Watchdog:
  """Watches the phases of one run. `timeout_s` <= 0 turns the phase bound off."""

  def __init__(
    self,
    timeout_s: float,
    sigterm_grace_s: float = 120.0,
    hint: str = 'the last checkpoint is kept; start the same command again to resume from it',
  ):
    self.timeout_s, self.sigterm_grace_s, self.hint = timeout_s, sigterm_grace_s, hint
    self._lock = threading.Lock()
    self._phase = None  # (name, step, deadline)
    self._sigterm_at = None
    self._wakeup = None
    self._stop = threading.Event()
    self._thread = None

  def start(self) -> 'Watchdog':
    if threading.current_thread() is threading.main_thread():
      read_fd, write_fd = os.pipe()
      os.set_blocking(read_fd, False)
      os.set_blocking(write_fd, False)
      try:
        previous = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
      except ValueError:  # not the main interpreter
        os.close(read_fd)
        os.close(write_fd)
      else:
        self._wakeup = (read_fd, write_fd, previous)
    self._thread = threading.Thread(target=self._watch, daemon=True, name='lmjax-watchdog')
    self._thread.start()
    global _active
    _active = self
    return self

  def close(self) -> None:
    global _active
    if _active is self:
      _active = None
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=5)
    if self._wakeup is not None:
      read_fd, write_fd, previous = self._wakeup
      signal.set_wakeup_fd(previous)
      os.close(read_fd)
      os.close(write_fd)
      self._wakeup = None

  def __enter__(self):
    return self.start()

  def __exit__(self, *exc_info):
    self.close()

  @contextlib.contextmanager
  def phase(self, name: str, step: int, timeout_s: float | None = None):
    """The block must end within `timeout_s` (default: the watchdog's)."""
    limit = self.timeout_s if timeout_s is None else timeout_s
    with self._lock:
      outer = self._phase
      self._phase = (name, step, time.monotonic() + limit if limit > 0 else None, limit)
    try:
      yield
    finally:
      with self._lock:
        self._phase = outer

  def beat(self) -> None:
    with self._lock:
      if self._phase is not None and self._phase[2] is not None:
        self._phase = self._phase[:2] + (time.monotonic() + self._phase[3], self._phase[3])

  def _sigterm_arrived(self) -> bool:
    if self._wakeup is None:
      return False
    try:
      data = os.read(self._wakeup[0], 512)
    except BlockingIOError:
      return False
    return signal.SIGTERM in data

  def _watch(self) -> None:
    while not self._stop.is_set():
      readable = [self._wakeup[0]] if self._wakeup else []
      if readable:
        select.select(readable, [], [], 1.0)
      else:
        self._stop.wait(1.0)
      now = time.monotonic()
      if self._sigterm_at is None and self._sigterm_arrived():
        self._sigterm_at = now
      with self._lock:
        phase = self._phase
      where = f'step {phase[1]}, {phase[0]}' if phase else 'between phases'
      if self._sigterm_at is not None and now - self._sigterm_at > self.sigterm_grace_s:
        self._die(
          f'SIGTERM was not obeyed within {self.sigterm_grace_s:.0f}s: the run is '
          f'stuck at {where}; exiting without a new checkpoint'
        )
      if phase and phase[2] is not None and now > phase[2]:
        self._die(
          f'{phase[0]} at step {phase[1]} made no progress for {phase[3]:.0f}s: a '
          'device program or a collective across processes is stuck (a peer process '
          'died or hangs?)'
        )

  def _die(self, message: str) -> None:
    print(
      f'error: {message}; {self.hint}. (The bound is train.phase_timeout_s.)',
      file=sys.stderr,
      flush=True,
    )
    os._exit(HUNG_EXIT_CODE)
