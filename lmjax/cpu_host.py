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
- One XLA device per core for Transformers (`cpu_device_count`).
"""
import ctypes
import math
import os
import sys

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
  return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and
              mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def cpu_device_count(config, cores: int) -> int:
  """How many XLA devices to split a CPU host of `cores` cores into.

  XLA:CPU runs a Transformer step's many small operations one at a time, so
  one device leaves the other cores mostly idle; one device per core, in data
  parallel, keeps them busy. A recurrent model's step is a few large matmuls
  that already use every core, and splitting its batch only slows it.
  The count is `config.cpu_devices` when set; the product of an explicit mesh;
  otherwise the largest count up to `cores` that divides both batch sizes.
  """
  from lmjax import sharding
  from lmjax.models import recurrent
  if config.cpu_devices:
    return int(config.cpu_devices)
  sizes = [int(config.mesh[axis]) for axis in sharding.MESH_AXES]
  if -1 not in sizes:
    return math.prod(sizes)
  count = 1 if config.model.family in recurrent.CELLS else max(1, cores)
  while count > 1 and (config.train.batch_size % count or config.train.eval_batch_size % count):
    count -= 1
  return count


def split_cpu_host(config, multi_process: bool = False) -> int | None:
  """Splits the CPU backend into `cpu_device_count` devices (via XLA_FLAGS, before
  JAX starts its backends). Leaves alone an explicit
  --xla_force_host_platform_device_count, multi-process runs (whose launchers
  choose), and a backend that has already started. Returns the count set, if any."""
  from jax._src import xla_bridge
  flags = os.environ.get('XLA_FLAGS', '')
  if ('xla_force_host_platform_device_count' in flags or multi_process
      or xla_bridge.backends_are_initialized()):
    return None
  count = cpu_device_count(config, len(os.sched_getaffinity(0)))
  if count > 1:
    os.environ['XLA_FLAGS'] = f'{flags} --xla_force_host_platform_device_count={count}'.strip()
  return count


def prepare(config=None, multi_process: bool = False) -> int | None:
  """The settings of the module docstring, before JAX starts its backends; the
  host is split only for a training `config`. Returns `split_cpu_host`'s count."""
  import jax
  retain_freed_memory()
  jax.config.update('jax_cpu_enable_async_dispatch', False)
  return None if config is None else split_cpu_host(config, multi_process)
