"""Process settings for running XLA on a CPU host; call `prepare` before JAX starts.

Three settings, each measured with `tools/bench.py` on a 2-core VM:

- Freed memory stays in the process (`retain_freed_memory`). XLA:CPU allocates
  every step's buffers (one temporary arena, tens of MB) with malloc and frees
  them after the step. glibc hands blocks above its mmap threshold (at most
  32 MB) straight back to the kernel, so each step page-faulted its whole
  working set in again: 15,000 faults and ~20 ms of a PTB-small LSTM step
  (80 -> 60 ms with the setting), 12,500 faults in a one-device
  shakespeare_char step (57 -> 40 ms).
- Synchronous dispatch on CPU: the step runs on the calling thread, whose
  allocations come from glibc's main arena, which the setting above governs.
  Asynchronous dispatch runs it on a worker thread, whose arena unmaps an
  emptied heap whatever the thresholds (strace: a 64 MB heap mapped and
  unmapped every step). The train loop loses little: tf.data prefetches in its
  own threads.
- One XLA device per core only when asked (`cpu_device_count`).

Several CPU devices in one process (a split host, a simulated pod) launch
each device's part of a program on a shared thread pool, where a later
program's launch on a device can take that device's in-flight slot and then
wait for an input that an earlier program, queued behind the slot, has not
produced: a deadlock (gdb on a hung 2-process x 2-device run: one local
device in the evaluation's gloo all-reduce, the other's launch blocked in
`Semaphore::Acquire`, a third launch in `BlockUntilReady`). `settle` waits
for each program there before the next is dispatched, and XLA's in-process
rendezvous waits for a late device instead of aborting after 40 s.
"""

import ctypes
import functools
import math
import os
import sys

import jax

from lmjax import sharding
from lmjax.models import recurrent

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
MMAP_THRESHOLD = 1 << 30  # blocks below this come from (and return to) the heap
TRIM_THRESHOLD = 2 << 30  # free memory kept at the top of the heap


def retain_freed_memory() -> bool:
  """Tells glibc's malloc to keep freed blocks up to 1 GiB for reuse instead of
  returning them to the kernel. True if set; False off glibc (nothing to do)."""
  if not sys.platform.startswith('linux'):
    return False
  try:
    libc = ctypes.CDLL('libc.so.6')
    mallopt = libc.mallopt
  except (OSError, AttributeError):  # not glibc (musl, ...)
    return False
  return bool(
    mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
  )


# XLA aborts the process when a device is 40 s late to an in-process collective
# (rendezvous.cc "Termination timeout"); a loaded host can be that slow without
# anything being wrong. lmjax's own watchdog bounds a real hang instead, with an
# error naming the step and phase.
RENDEZVOUS_TERMINATE_S = 3600


def cpu_device_count(config, cores: int) -> int:
  """How many XLA devices to split a CPU host of `cores` cores into: one unless
  asked. `config.cpu_devices=-1` asks for one per core for Transformers (the
  largest count up to `cores` that divides both batch sizes; recurrent models
  keep one, their few large matmuls already use every core); N > 0 asks for
  N; an explicit mesh for its product.

  One device per core ran a shakespeare_char step in 38.6 ms against 40-42 on
  one device (5 %), but puts in-process collectives in every step; one device
  has none, so a slow moment on a loaded machine can only cost time."""
  if config.cpu_devices > 0:
    return int(config.cpu_devices)
  sizes = [int(config.mesh[axis]) for axis in sharding.MESH_AXES]
  if -1 not in sizes:
    return math.prod(sizes)
  if config.cpu_devices == 0 or config.model.family in recurrent.CELLS:
    return 1
  count = max(1, cores)
  while count > 1 and (config.train.batch_size % count or config.train.eval_batch_size % count):
    count -= 1
  return count


def split_cpu_host(config, multi_process: bool = False) -> int | None:
  """Splits the CPU backend into `cpu_device_count` devices (`jax_num_cpu_devices`,
  before JAX starts its backends). Leaves alone an explicit
  --xla_force_host_platform_device_count, multi-process runs (whose launchers
  choose), and a backend that has already started. Returns the count set, if any."""
  if 'xla_force_host_platform_device_count' in os.environ.get('XLA_FLAGS', '') or multi_process:
    return None
  count = cpu_device_count(config, len(os.sched_getaffinity(0)))
  if count > 1:
    try:
      jax.config.update('jax_num_cpu_devices', count)
    except RuntimeError:  # JAX refuses once a backend has started: too late to split
      return None
  return count


def _patient_rendezvous() -> None:
  flags = os.environ.get('XLA_FLAGS', '')
  if 'xla_cpu_collective_call_terminate_timeout_seconds' not in flags:
    os.environ['XLA_FLAGS'] = (
      f'{flags} --xla_cpu_collective_call_terminate_timeout_seconds={RENDEZVOUS_TERMINATE_S}'
    ).strip()


@functools.cache
def _several_cpu_devices() -> bool:
  return jax.default_backend() == 'cpu' and jax.local_device_count() > 1


def settle(tree):
  """`tree` (a program's outputs), after waiting for it when this process runs
  several CPU devices (see the module docstring); at once otherwise."""
  if _several_cpu_devices():
    jax.block_until_ready(tree)
  return tree


def prepare(config=None, multi_process: bool = False) -> int | None:
  """The settings of the module docstring, before JAX starts its backends; the
  host is split only for a training `config`. Returns `split_cpu_host`'s count."""
  retain_freed_memory()
  jax.config.update('jax_cpu_enable_async_dispatch', False)
  count = None if config is None else split_cpu_host(config, multi_process)
  _patient_rendezvous()  # after the split: both go into XLA_FLAGS before JAX starts
  return count
