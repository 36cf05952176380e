"""Joining a multi-process (multi-host) JAX job.

`initialize()` calls `jax.distributed.initialize` only when the run is
multi-process: given a coordinator address and process count (flags or the
LMJAX_COORDINATOR_ADDRESS / LMJAX_NUM_PROCESSES / LMJAX_PROCESS_ID
environment variables), or on a Cloud TPU VM slice (LMJAX_DISTRIBUTED=auto, which
launch/tpu.py sets, or several TPU_WORKER_HOSTNAMES), where JAX finds its peers
itself. A peer that never joins ends the run after
`timeout` seconds with a message naming the coordinator, instead of hanging.
On CPU, cross-process collectives use gloo.
"""

import os
import sys

import jax
from absl import flags


class DistributedError(RuntimeError):
  """This process could not join (or form) the multi-process job."""


def _tpu_pod_worker() -> bool:
  hostnames = os.environ.get('TPU_WORKER_HOSTNAMES', '')
  return len([h for h in hostnames.split(',') if h]) > 1


def settings(
  coordinator_address: str = '', num_processes: int = 0, process_id: int = -1
) -> dict | None:
  """The job to join (flags first, then the environment), or None if single-process."""
  address = coordinator_address or os.environ.get('LMJAX_COORDINATOR_ADDRESS', '')
  count = num_processes or int(os.environ.get('LMJAX_NUM_PROCESSES', '0') or 0)
  index = process_id if process_id >= 0 else int(os.environ.get('LMJAX_PROCESS_ID', '-1'))
  if address or count > 1:
    if not (address and count > 1 and 0 <= index < count):
      raise DistributedError(
        'a multi-process run needs a coordinator address, a process count above 1 and this '
        f'process id in [0, count): got address {address!r}, count {count}, id {index}'
      )
    return {'coordinator_address': address, 'num_processes': count, 'process_id': index}
  if _tpu_pod_worker() or os.environ.get('LMJAX_DISTRIBUTED') == 'auto':
    return {}  # Cloud TPU VM slice: JAX reads the topology from the metadata server.
  return None


def initialize(
  coordinator_address: str = '', num_processes: int = 0, process_id: int = -1, timeout: int = 300
) -> bool:
  """Joins the multi-process job if there is one; returns whether there was."""
  job = settings(coordinator_address, num_processes, process_id)
  if job is None:
    return False
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  where = job.get('coordinator_address', 'the TPU slice')
  # When a peer is missing, JAX aborts the process from C++ (DEADLINE_EXCEEDED) rather
  # than raising, so say first what is being waited for.
  print(
    f'lmjax: process {job.get("process_id", "?")} joining the '
    f'{job.get("num_processes", "")}-process job with coordinator {where}; if every '
    f'process has not joined within {timeout}s, the run ends (DEADLINE_EXCEEDED)',
    file=sys.stderr,
    flush=True,
  )
  try:
    jax.distributed.initialize(**job, initialization_timeout=timeout)
  except Exception as error:  # noqa: BLE001 - jax raises several kinds
    raise DistributedError(
      f'process {job.get("process_id", "?")} could not form the {job.get("num_processes", "")}'
      f'-process job with coordinator {where} within {timeout}s (is every process started, '
      f'with the same address and count?): {type(error).__name__}: {error}'
    ) from error
  return True


def define_flags() -> None:
  """The multi-process flags every entry point takes (absl)."""
  flags.DEFINE_string(
    'coordinator_address',
    '',
    'Multi-process: host:port of process 0 '
    '(or $LMJAX_COORDINATOR_ADDRESS; automatic on Cloud TPU VM slices).',
  )
  flags.DEFINE_integer('num_processes', 0, 'Multi-process: number of processes.')
  flags.DEFINE_integer('process_id', -1, 'Multi-process: this process (0-based).')
  flags.DEFINE_integer('distributed_timeout', 300, 'Seconds to wait for every process to join.')


def initialize_from_flags() -> bool:
  """`initialize` with the values of the flags `define_flags` defined."""
  values = flags.FLAGS
  return initialize(
    values.coordinator_address, values.num_processes, values.process_id, values.distributed_timeout
  )
