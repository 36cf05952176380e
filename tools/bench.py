#!/usr/bin/env python
"""Train-step benchmark: prints one JSON line.

    python tools/bench.py --config configs/shakespeare_char.py [--steps 50] \
        [--config.model.num_layers=6 ...]

Times the configured model's jitted train step (same code as lmjax.train) on
random token batches of the configured shape, so no corpus is needed. The
vocabulary size comes from the tokenizer kind (bytes: 257, sentencepiece: its
configured size, chars: --vocab_size, default 67 = tiny-shakespeare's 65
characters + <eos> + <unk>). MFU divides model FLOP/s (6 x parameters x tokens
plus attention) by the peak of a large f32 matmul measured in this process.

    python tools/bench.py --suite cpu

runs every workload of the CPU performance table (each in its own process, so
each splits the host as lmjax.train would) and prints one JSON line each, with
its name and command.
"""

import json
import os
import resource
import statistics
import subprocess
import sys
import time

from absl import app
from absl import flags

from lmjax import config as config_lib

flags.DEFINE_integer('steps', 50, 'Timed steps (after one warm-up step).')
flags.DEFINE_integer('vocab_size', 0, 'Vocabulary size (0 = from the tokenizer kind).')
flags.DEFINE_string(
  'compilation_cache_dir',
  '',
  'Persistent compilation cache to use (to time '
  'a warm start: run twice with the same directory); default none.',
)
flags.DEFINE_enum('suite', '', ['', 'cpu'], 'Run a whole suite of workloads instead.')

SUITES = {
  'cpu': [  # (name, arguments)
    ('shakespeare_char step', ['--config', 'configs/shakespeare_char.py', '--steps', '100']),
    (
      'shakespeare_char step, one device per core',
      ['--config', 'configs/shakespeare_char.py', '--steps', '100', '--config.cpu_devices=-1'],
    ),
    ('default config step', ['--config', 'configs/default.py', '--steps', '100']),
    (
      'default config step, one device per core',
      ['--config', 'configs/default.py', '--steps', '100', '--config.cpu_devices=-1'],
    ),
    (
      'transformer 6L/6H/384, context 256, batch 16',
      [
        '--config',
        'configs/shakespeare_char.py',
        '--steps',
        '10',
        '--config.model.num_layers=6',
        '--config.model.num_heads=6',
        '--config.model.embed_dim=384',
        '--config.data.seq_len=256',
        '--config.train.batch_size=16',
      ],
    ),
    (
      'PTB-small LSTM step',
      ['--config', 'configs/ptb_lstm_small.py', '--vocab_size', '10000', '--steps', '50'],
    ),
    ('char LSTM 2x512 step', ['--config', 'configs/shakespeare_char_lstm.py', '--steps', '10']),
    (
      'default config, cold compilation cache',
      ['--config', 'configs/default.py', '--steps', '5', '--compilation_cache_dir', '{cache}'],
    ),
    (
      'default config, warm compilation cache',
      ['--config', 'configs/default.py', '--steps', '5', '--compilation_cache_dir', '{cache}'],
    ),
  ]
}


def run_suite(name: str) -> None:
  """Each workload in a fresh process (the cache runs share one new directory)."""
  import tempfile

  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  with tempfile.TemporaryDirectory() as cache:
    for title, arguments in SUITES[name]:
      arguments = [a.replace('{cache}', cache) for a in arguments]
      command = [sys.executable, os.path.abspath(__file__)] + arguments
      result = subprocess.run(command, capture_output=True, text=True, cwd=repo)
      if result.returncode:
        print(json.dumps({'workload': title, 'error': result.stderr[-2000:]}), flush=True)
        continue
      measured = json.loads(result.stdout.strip().splitlines()[-1])
      print(
        json.dumps(
          {
            'workload': title,
            'command': ' '.join(['python tools/bench.py'] + arguments),
            **measured,
          }
        ),
        flush=True,
      )


def vocab_size_for(config) -> int:
  if flags.FLAGS.vocab_size:
    return flags.FLAGS.vocab_size
  return {'bytes': 257, 'chars': 67}.get(config.tokenizer.kind, config.tokenizer.vocab_size)


def random_batch(config, vocab: int, rng):
  """A training batch of the configured task and layout (`tasks.batch_shapes`) with
  random tokens: packed rows hold two documents each, so attention is masked as
  in training."""
  import numpy as np

  from lmjax import tasks

  batch_size, seq_len = config.train.batch_size, config.data.seq_len
  batch = {}
  for name, (shape, dtype) in tasks.get(config.task).batch_shapes(config, batch_size).items():
    if name in ('inputs', 'targets') and len(shape) == 2:
      batch[name] = rng.integers(0, vocab, shape, dtype=np.int32)
    elif name == 'targets':  # classification: one class per row
      batch[name] = rng.integers(0, max(config.classify.num_classes, 2), shape, dtype=np.int32)
    elif name == 'segment_ids':
      batch[name] = (
        np.where(np.arange(seq_len) < seq_len // 2, 1, 2).astype(dtype)[None].repeat(batch_size, 0)
      )
    elif name == 'positions':
      batch[name] = (
        (np.arange(seq_len) % max(seq_len // 2, 1)).astype(dtype)[None].repeat(batch_size, 0)
      )
    elif name == 'reset':
      batch[name] = np.zeros(shape, dtype)
    else:  # weights
      batch[name] = np.ones(shape, dtype)
  return batch


def build(config, vocab: int):
  """(state, jitted step, model, num_params, mesh) of `config`, from the builder
  lmjax.train uses (`steps.build_train_step`: microbatches, loss normalization,
  dropout, a fine-tuning plan), on the parameters a new run starts from."""
  import jax

  from lmjax import finetune
  from lmjax import models
  from lmjax import sharding
  from lmjax import steps
  from lmjax import tasks
  from lmjax import train_state

  seq_len = config.data.seq_len
  mesh = sharding.make_mesh(config.mesh)
  task = tasks.get(config.task)
  # An 'epochs' schedule needs the data's epoch length; any value times the same step.
  record = task.from_shapes(config, vocab)
  model = task.build_model(config, record)
  tx, schedule, plan = finetune.optimizer_and_plan(config, model, record)
  carry_rows = train_state.carry_rows(config, model)  # time the carried state too
  _, shardings = train_state.abstract_state(model, tx, seq_len, mesh, carry_rows, plan)
  init_rng = jax.random.fold_in(jax.random.key(config.seed), 0)  # as lmjax.train
  state = train_state.create_state(model, tx, seq_len, shardings, init_rng, carry_rows, plan)
  state, step_fn = steps.build_train_step(
    config, model, schedule, state, shardings, mesh, plan, carry_rows
  )
  return state, step_fn, model, models.count_params(state.params), mesh


def main(argv):
  del argv
  if flags.FLAGS.suite:
    run_suite(flags.FLAGS.suite)
    return
  import jax
  import numpy as np

  from lmjax import cpu_host
  from lmjax import metrics
  from lmjax import train

  config = flags.FLAGS.config
  cpu_host.prepare(config)  # as lmjax.train does
  train.enable_compilation_cache(flags.FLAGS.compilation_cache_dir)
  seq_len, batch_size = config.data.seq_len, config.train.batch_size
  vocab = vocab_size_for(config)
  state, step_fn, model, num_params, mesh = build(config, vocab)
  data_rng = np.random.default_rng(0)
  batch = lambda: step_fn.place(random_batch(config, vocab, data_rng))
  rng = jax.random.key(1)
  start = time.perf_counter()
  state, out = step_fn(state, batch(), rng)  # compiles at its first call
  jax.block_until_ready(out)
  first_step_s = time.perf_counter() - start
  state, out = step_fn(state, batch(), rng)
  jax.block_until_ready(out)
  batches = [batch() for _ in range(flags.FLAGS.steps)]  # placed before the clock starts
  times = []
  for b in batches:
    start = time.perf_counter()
    state, out = step_fn(state, b, rng)
    jax.block_until_ready(out)
    times.append(time.perf_counter() - start)
  step_s = statistics.median(times)
  tokens = batch_size * seq_len
  flops = metrics.flops_per_token(model, num_params, seq_len) * tokens
  peak, peak_source = metrics.peak_flops(config.model.dtype)
  hardware = flops * metrics.hardware_flops_ratio(config.model.remat)
  print(
    json.dumps(
      {
        'config': flags.FLAGS['config'].config_filename
        if hasattr(flags.FLAGS['config'], 'config_filename')
        else None,
        'model': config.model.family,
        'task': config.task,
        'params': num_params,
        'batch_size': batch_size,
        'microbatches': config.train.microbatches,
        'layout': config.data.layout,
        'parallelism': config.parallelism,
        'seq_len': seq_len,
        'vocab_size': vocab,
        'devices': jax.device_count(),
        'steps': flags.FLAGS.steps,
        'step_ms': 1e3 * step_s,
        'step_ms_mean': 1e3 * statistics.mean(times),
        'tokens_per_sec': tokens / step_s,
        'first_step_s': first_step_s,  # compile + one step
        'model_gflops_per_sec': flops / step_s / 1e9,
        'mfu': flops / step_s / peak,  # model FLOPs
        'hfu': hardware / step_s / peak,  # hardware FLOPs (remat recomputation counted)
        'peak_flops': peak,
        'peak_source': peak_source,  # 'vendor' (data sheet) or 'measured' (CPU matmul)
        'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        'loss': float(out['loss_sum'] / out['weight_sum']),
      }
    )
  )


if __name__ == '__main__':
  config_lib.define_config_flag('configs/default.py')
  app.run(main)
