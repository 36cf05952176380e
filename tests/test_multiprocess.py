"""Two real processes (jax.distributed on 127.0.0.1, gloo): per-host input, training
together, checkpoints that restore on one device, and a peer that never joins."""

import json
import pathlib
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


def run_two(script, *args, timeout=300):
  """Runs `script PROCESS_ID PORT *args OUTPUT` as processes 0 and 1; returns their JSON."""
  port = free_port()
  outputs = [pathlib.Path(args[-1]) / f'process{i}.json' for i in range(2)]
  workers = [
    subprocess.Popen(
      [
        sys.executable,
        str(REPO / 'tests' / script),
        str(i),
        str(port),
        *map(str, args[:-1]),
        str(outputs[i]),
      ],
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  logs = []
  for worker in workers:
    try:
      logs.append(worker.communicate(timeout=timeout)[0])
    except subprocess.TimeoutExpired:
      for w in workers:
        w.kill()
      pytest.fail(f'a worker did not finish in {timeout} s')
  for worker, log in zip(workers, logs):
    assert worker.returncode == 0, log[-3000:]
  return [json.loads(path.read_text()) for path in outputs]


def test_two_processes_read_disjoint_rows_that_form_the_single_process_batch(tmp_path):
  results = run_two('multiprocess_worker.py', tmp_path)

  stream = pipeline.TokenStream(
    tokens=(np.arange(5000) % 97).astype(np.int32), num_documents=1, num_bytes=5000
  )
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


def test_two_processes_train_like_one_process_and_restore_on_one_device(corpus_dir, tmp_path):
  import jax
  import ml_collections
  from multiprocess_train_worker import TRAIN_OVERRIDES

  from conftest import tiny_config
  from lmjax import checkpoint
  from lmjax import evaluation
  from lmjax import metrics
  from lmjax import models
  from lmjax import sharding
  from lmjax import train
  from lmjax import train_state

  workdir = tmp_path / 'two'
  results = run_two('multiprocess_train_worker.py', corpus_dir, workdir, tmp_path)
  assert [(r['process_index'], r['process_count'], r['devices']) for r in results] == [
    (0, 2, 8),
    (1, 2, 8),
  ]
  assert results[0]['result'] == results[1]['result']  # both evaluated the same model
  # Each process prepared its share of the token store's shards (under its share's lock).
  store_dir = next((tmp_path / 'two_stores' / 'files').glob('train-*'))
  assert sorted(p.name for p in store_dir.glob('.prepare-*')) == [
    '.prepare-0-of-2.lock',
    '.prepare-1-of-2.lock',
  ]
  assert (store_dir / 'manifest.json').is_file()
  # One process with 8 devices, reading the store the two prepared: the same loss curve.
  config = tiny_config(
    corpus_dir, **TRAIN_OVERRIDES, **{'data.cache_dir': str(tmp_path / 'two_stores')}
  )
  single = train.train_and_evaluate(config, str(tmp_path / 'one'))
  curve = lambda d: [
    (r['step'], r['train/loss']) for r in metrics.read_metrics(str(d)) if 'train/loss' in r
  ]
  two_curve, one_curve = curve(workdir), curve(tmp_path / 'one')
  assert [s for s, _ in two_curve] == [s for s, _ in one_curve] == [10, 20]
  np.testing.assert_allclose(
    [loss for _, loss in two_curve], [loss for _, loss in one_curve], rtol=1e-4
  )
  np.testing.assert_allclose(results[0]['result']['loss'], single['loss'], rtol=1e-4)
  # The checkpoint both processes wrote restores on one device, with the same evaluation.
  manager = checkpoint.manager(str(workdir), read_only=True)
  assert sorted(manager.all_steps()) == [10, 20]
  tokenizer, data, _ = train.load_data(config, str(workdir))
  mesh = sharding.make_mesh(
    ml_collections.ConfigDict({'data': 1, 'fsdp': 1, 'tensor': 1}), jax.devices()[:1]
  )
  model = models.build_model(config.model, tokenizer.vocab_size, config.data.seq_len)
  tx, _ = train_state.make_optimizer(config.optimizer, config.train.num_steps)
  abstract, shardings = train_state.abstract_state(model, tx, config.data.seq_len, mesh)
  state = checkpoint.restore_state(manager, 20, abstract)
  eval_fn = evaluation.make_eval_fn(model, tokenizer, shardings.params, mesh)
  restored = evaluation.evaluate(
    eval_fn,
    state.params,
    data.eval,
    config.data.seq_len,
    config.train.eval_batch_size,
    mesh,
    config.train.final_eval_batches,
  )
  np.testing.assert_allclose(restored['loss'], results[0]['result']['loss'], rtol=1e-5)


def test_a_peer_that_never_joins_ends_the_run_with_a_clear_error(tmp_path):
  import time

  command = [
    sys.executable,
    '-m',
    'lmjax.train',
    '--config',
    'configs/default.py',
    '--workdir',
    str(tmp_path),
    '--coordinator_address',
    f'127.0.0.1:{free_port()}',
    '--num_processes',
    '2',
    '--process_id',
    '0',
    '--distributed_timeout',
    '10',
  ]
  start = time.monotonic()
  result = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=REPO)
  assert result.returncode != 0
  assert 'joining the 2-process job with coordinator 127.0.0.1' in result.stderr
  assert 'DEADLINE_EXCEEDED' in result.stderr
  assert time.monotonic() - start < 120
