"""One process of a two-process training job on 127.0.0.1 (CPU, gloo, 4 devices each).

    python tests/multiprocess_train_worker.py PROCESS_ID PORT CORPUS_DIR WORKDIR OUTPUT.json

Joins the job through lmjax.distributed (the trainer's own code path), trains the
tiny test config for 20 steps with a checkpoint every 10, and writes its final
evaluation. Used by tests/test_multiprocess.py (which imports TRAIN_OVERRIDES).
"""

import json
import os
import pathlib
import sys

TRAIN_OVERRIDES = {
  'train.num_steps': 20,
  'train.eval_every': 10,
  'checkpoint.every': 10,
  'sample.max_new_tokens': 0,
}


def main():
  process_id, port, corpus_dir, workdir, output = sys.argv[1:6]
  sys.path.insert(0, os.path.dirname(__file__))
  from conftest import tiny_config  # it asks for 8 devices: ask for 4 before jax starts

  os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=4'
  from lmjax import distributed
  from lmjax import train

  distributed.initialize(f'127.0.0.1:{port}', 2, int(process_id), timeout=120)
  import jax

  stores = {'data.cache_dir': f'{workdir}_stores'}  # fresh: the two prepare it together
  result = train.train_and_evaluate(
    tiny_config(pathlib.Path(corpus_dir), **TRAIN_OVERRIDES, **stores), workdir
  )
  with open(output, 'w') as f:
    json.dump(
      {
        'process_index': jax.process_index(),
        'process_count': jax.process_count(),
        'devices': jax.device_count(),
        'result': result,
      },
      f,
    )
  jax.distributed.shutdown()


if __name__ == '__main__':
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  main()
