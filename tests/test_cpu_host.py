"""CPU host settings: freed memory stays in the process; entry points dispatch synchronously
and split a CPU host into one device per core for Transformers."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO
from lmjax import config as config_lib
from lmjax import cpu_host

# Mallocs, writes and frees a 64 MB block 5 times (as XLA:CPU does with a step's
# buffers), before and after the setting, counting the page faults of each round
# (a fault = the kernel mapping a fresh zeroed page into the process).
_PROBE = """
import ctypes, json, resource
from lmjax import cpu_host

libc = ctypes.CDLL('libc.so.6')
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
SIZE = 64 << 20

def faults():
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  for _ in range(5):
    block = libc.malloc(SIZE)
    ctypes.memset(block, 1, SIZE)
    libc.free(block)
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

default = faults()
retained = cpu_host.retain_freed_memory()
faults()  # the first round after the setting may still map the block once
after = faults()
cpu_host.prepare()
import jax
import os
print(json.dumps({'default': default, 'retained': retained, 'after': after,
                  'async': jax.config.read('jax_cpu_enable_async_dispatch'),
                  'xla_flags': os.environ.get('XLA_FLAGS', '')}))
"""


def test_freed_blocks_are_reused_instead_of_faulted_in_again():
  result = subprocess.run(
    [sys.executable, '-c', _PROBE], capture_output=True, text=True, cwd=REPO, timeout=120
  )
  assert result.returncode == 0, result.stderr[-2000:]
  measured = json.loads(result.stdout.strip().splitlines()[-1])
  pages = 5 * (64 << 20) // 4096
  assert measured['retained'] is True
  assert measured['default'] > 0.9 * pages  # glibc returned each block to the kernel
  assert measured['after'] < 0.05 * pages, measured  # now the block is reused
  assert measured['async'] is False
  # XLA's in-process rendezvous waits for a late device instead of aborting after 40 s.
  assert (
    f'--xla_cpu_collective_call_terminate_timeout_seconds={cpu_host.RENDEZVOUS_TERMINATE_S}'
  ) in measured['xla_flags']


def test_cpu_host_is_one_device_unless_a_split_is_asked_for():
  config = config_lib.base_config()
  config.train.batch_size, config.train.eval_batch_size = 12, 64
  # The default: one device, so no step has an in-process collective that a
  # loaded machine could make XLA abort.
  assert cpu_host.cpu_device_count(config, cores=2) == 1
  config.cpu_devices = -1  # one per core, for Transformers
  assert cpu_host.cpu_device_count(config, cores=2) == 2
  assert cpu_host.cpu_device_count(config, cores=8) == 4  # the largest count dividing 12 and 64
  config.train.batch_size = 7
  assert cpu_host.cpu_device_count(config, cores=2) == 1
  config.train.batch_size = 12
  config.model.family = 'lstm'  # large matmuls already use every core
  assert cpu_host.cpu_device_count(config, cores=2) == 1
  config.cpu_devices = 4
  assert cpu_host.cpu_device_count(config, cores=2) == 4
  config.cpu_devices, config.model.family = -1, 'transformer'
  config.mesh.data, config.mesh.fsdp = 1, 3  # an explicit mesh says how many
  assert cpu_host.cpu_device_count(config, cores=2) == 3
  # Here the backend has started (8 devices, from conftest): nothing changes.
  assert cpu_host.split_cpu_host(config) is None


@pytest.mark.slow
def test_train_splits_a_cpu_host_unless_told_how_many_devices():
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  command = [
    sys.executable,
    '-m',
    'lmjax.train',
    '--config',
    'configs/shakespeare_char.py',
    '--compile_only',
  ]
  counts = []
  for flags, extra in (
    ('', []),
    ('', ['--config.cpu_devices=-1']),
    ('--xla_force_host_platform_device_count=1', ['--config.cpu_devices=-1']),
  ):
    result = subprocess.run(
      command + extra,
      capture_output=True,
      text=True,
      timeout=300,
      cwd=REPO,
      env={**env, 'XLA_FLAGS': flags},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    counts.append(json.loads(result.stdout)['chips'])
  config = config_lib.load_config_file(str(REPO / 'configs' / 'shakespeare_char.py'))
  config.cpu_devices = -1
  auto = cpu_host.cpu_device_count(config, len(os.sched_getaffinity(0)))
  assert counts == [1, auto, 1]
