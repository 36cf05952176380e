"""One process of a two-process jax.distributed job on 127.0.0.1 (CPU, gloo).

    python tests/multiprocess_worker.py PROCESS_ID PORT OUTPUT.json

Each process reads its own rows of the training batch, assembles the global
array over all 8 devices (4 per process) and reduces it with a real
cross-process collective. Used by tests/test_multiprocess.py.
"""

import json
import os
import sys

os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=4'
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update('jax_cpu_collectives_implementation', 'gloo')


def main():
  process_id, port, output = int(sys.argv[1]), sys.argv[2], sys.argv[3]
  jax.distributed.initialize(
    coordinator_address=f'127.0.0.1:{port}',
    num_processes=2,
    process_id=process_id,
    initialization_timeout=60,
  )
  from lmjax import sharding
  from lmjax.data import pipeline

  stream = pipeline.TokenStream(
    tokens=(np.arange(5000) % 97).astype(np.int32), num_documents=1, num_bytes=5000
  )
  mesh = sharding.make_mesh(ml_collections.ConfigDict({'data': -1, 'fsdp': 1, 'tensor': 1}))
  batches = pipeline.train_batches(
    stream,
    seq_len=16,
    global_batch=8,
    seed=5,
    start_step=3,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  local = next(batches)
  global_batch = sharding.make_global_batch(local, mesh)
  row_sums = jax.jit(lambda x: x.sum(axis=1), out_shardings=sharding.replicated(mesh))(
    global_batch['inputs']
  )
  with open(output, 'w') as f:
    json.dump(
      {
        'process_index': jax.process_index(),
        'process_count': jax.process_count(),
        'devices': jax.device_count(),
        'local_devices': jax.local_device_count(),
        'global_shape': list(global_batch['inputs'].shape),
        'local_rows': local['inputs'].tolist(),
        'row_sums': np.asarray(row_sums).tolist(),
      },
      f,
    )
  jax.distributed.shutdown()


if __name__ == '__main__':
  main()
