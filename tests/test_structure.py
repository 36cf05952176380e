"""Structure: a top-down import graph, no JAX internals, and one train-step builder
shared by training and the benchmark."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO
from conftest import tiny_config
from lmjax import train


def load_tool(name: str):
  spec = importlib.util.spec_from_file_location(name, REPO / 'tools' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_the_import_graph_has_no_cycles_and_imports_stay_at_the_top():
  report = load_tool('import_graph').analyse()
  assert 'lmjax.train' in report['graph'] and 'lmjax.tasks' in report['graph']['lmjax.train']
  assert report['cycles'] == []
  unexplained = [i for i in report['imports_inside_functions'] if not i['explained']]
  assert unexplained == []


def test_the_library_uses_no_jax_internals():
  offenders = [
    str(p.relative_to(REPO)) for p in (REPO / 'lmjax').rglob('*.py') if 'jax._src' in p.read_text()
  ]
  assert offenders == []


@pytest.mark.slow
def test_the_benchmark_times_the_step_training_runs(corpus_dir, tmp_path):
  # Microbatches, packed rows (segment ids) and dropout: what bench.py used to drop.
  config = tiny_config(
    corpus_dir,
    **{
      'train.microbatches': 2,
      'data.layout': 'packed',
      'model.dropout': 0.1,
      'train.num_steps': 1,
    },
  )
  run = train.setup(config, str(tmp_path / 'run'))
  bench = load_tool('bench')
  state, bench_step, _, _, mesh = bench.build(config, run.tokenizer.vocab_size)
  batch = bench.random_batch(config, run.tokenizer.vocab_size, np.random.default_rng(0))
  assert set(batch) == {'inputs', 'targets', 'weights', 'segment_ids', 'positions'}
  assert set(batch) == set(next(run.train_batches(0)))  # training's batch keys
  global_batch = run.train_step.place(batch)
  rng = jax.random.key(1)
  # Both start from the parameters a new run starts from.
  np.testing.assert_array_equal(
    jax.device_get(jax.tree.leaves(state.params)[0]),
    jax.device_get(jax.tree.leaves(run.state.params)[0]),
  )
  _, from_bench = bench_step(state, global_batch, rng)
  _, from_training = run.train_step(run.state, global_batch, rng)
  for name in ('loss_sum', 'weight_sum', 'grad_norm'):
    np.testing.assert_array_equal(np.asarray(from_bench[name]), np.asarray(from_training[name]))


def test_below_the_data_layer_nothing_imports_tensorflow(tmp_path):
  """Only the data layer (and object-store paths) need TensorFlow: GPU images often
  lack it. With TensorFlow unimportable, every module above the data layer loads,
  and the synthetic-batch benchmark trains (the tasks load the data layer lazily)."""
  blocked = tmp_path / 'no_tensorflow'
  for name in ('tensorflow', 'tensorflow_datasets'):
    (blocked / name).mkdir(parents=True)
    (blocked / name / '__init__.py').write_text(f'raise ImportError("{name} is blocked")\n')
  env = {**os.environ, 'PYTHONPATH': f'{blocked}{os.pathsep}{REPO}'}
  modules = (
    'models steps sharding checkpoint train_state metrics loop fs tasks aot validation '
    'evaluation evaluate sample train finetune'
  ).split()
  code = ''.join(f'import lmjax.{m}\n' for m in modules)
  done = subprocess.run(
    [sys.executable, '-c', code], capture_output=True, text=True, cwd=REPO, env=env, timeout=300
  )
  assert done.returncode == 0, done.stderr[-2000:]
  bench = subprocess.run(
    [sys.executable, 'tools/bench.py', '--config', 'configs/default.py', '--steps', '1']
    + ['--config.train.batch_size=8', '--config.data.seq_len=32', '--config.model.num_layers=2'],
    capture_output=True,
    text=True,
    cwd=REPO,
    env=env,
    timeout=300,
  )
  assert bench.returncode == 0, bench.stderr[-2000:]
  assert json.loads(bench.stdout.strip().splitlines()[-1])['tokens_per_sec'] > 0
