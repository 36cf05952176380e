"""Two real processes (jax.distributed on 127.0.0.1, gloo): per-host input."""
import json
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from lmjax.data import pipeline

pytestmark = pytest.mark.slow


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_read_disjoint_rows_that_form_the_single_process_batch(tmp_path):
  port = free_port()
  outputs = [tmp_path / f'process{i}.json' for i in range(2)]
  workers = [subprocess.Popen([sys.executable, str(REPO / 'tests' / 'multiprocess_worker.py'),
                               str(i), str(port), str(outputs[i])],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
  logs = []
  for worker in workers:
    try:
      logs.append(worker.communicate(timeout=180)[0])
    except subprocess.TimeoutExpired:
      for w in workers:
        w.kill()
      pytest.fail('a worker did not finish in 180 s')
  for worker, log in zip(workers, logs):
    assert worker.returncode == 0, log[-3000:]
  results = [json.loads(path.read_text()) for path in outputs]

  stream = pipeline.TokenStream(tokens=(np.arange(5000) % 97).astype(np.int32), num_documents=1,
                                num_bytes=5000)
  single = next(pipeline.train_batches(stream, seq_len=16, global_batch=8, seed=5, start_step=3))
  for index, result in enumerate(results):
    assert (result['process_index'], result['process_count']) == (index, 2)
    assert (result['devices'], result['local_devices']) == (8, 4)
    assert result['global_shape'] == [8, 16]
    assert len(result['local_rows']) == 4  # global batch 8 / 2 processes
  joined = np.array(results[0]['local_rows'] + results[1]['local_rows'])
  np.testing.assert_array_equal(joined, single['inputs'])  # disjoint, and together the batch
  # A cross-process reduction over the assembled global array sees every row.
  for result in results:
    np.testing.assert_array_equal(result['row_sums'], single['inputs'].sum(axis=1))
