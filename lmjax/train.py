"""Training: the loop that wires data, model, steps, metrics and checkpoints.

    python -m lmjax.train --config configs/default.py --workdir /tmp/run \
        [--config.train.num_steps=500 ...]

Started again with the same workdir, a run resumes from its latest checkpoint
and continues the same loss curve (the data order and dropout randomness are
functions of the step).
"""
import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from lmjax import checkpoint
from lmjax import config as config_lib
from lmjax import evaluate
from lmjax import metrics as metrics_lib
from lmjax import models
from lmjax import sample
from lmjax import sharding
from lmjax import steps
from lmjax import train_state
from lmjax.data import pipeline
from lmjax.data import tokenizers


def _log(message: str) -> None:
  if jax.process_index() == 0:
    print(message, flush=True)


def _format_seconds(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f'{seconds // 3600}h{seconds // 60 % 60:02d}m' if seconds >= 3600 else (
      f'{seconds // 60}m{seconds % 60:02d}s')


class _Progress:
  """Metric sums of finished steps, fetched one step late, and throughput."""

  def __init__(self, tokens_per_step: int, flops_per_step: float, peak_flops: float):
    self.tokens_per_step, self.flops_per_step, self.peak = tokens_per_step, flops_per_step, peak_flops
    self.pending = []  # (step, device metrics) not yet fetched
    self.window_start, self.window_steps = None, 0

  def add(self, step: int, device_metrics) -> None:
    self.pending.append((step, device_metrics))

  def fetch(self, keep_last: bool = True) -> dict | None:
    """Host sums of pending steps, leaving the step in flight unless keep_last=False."""
    ready = self.pending[:-1] if keep_last else self.pending
    self.pending = self.pending[-1:] if keep_last else []
    if not ready:
      return None
    values = jax.device_get([m for _, m in ready])
    for (step, _), m in zip(ready, values):
      if not np.isfinite(m['loss_sum']) or not np.isfinite(m['grad_norm']):
        raise FloatingPointError(f'loss or gradient is not finite at step {step + 1} '
                                 f'(loss_sum={m["loss_sum"]}, grad_norm={m["grad_norm"]}); '
                                 'stopping without saving a checkpoint')
    sums = {k: sum(float(m[k]) for m in values) for k in ('loss_sum', 'correct_sum', 'weight_sum')}
    return {'last_step': ready[-1][0] + 1, 'steps': len(values),
            'loss': sums['loss_sum'] / max(sums['weight_sum'], 1.0),
            'accuracy': sums['correct_sum'] / max(sums['weight_sum'], 1.0),
            'grad_norm': float(values[-1]['grad_norm']),
            'learning_rate': float(values[-1]['learning_rate'])}

  def throughput(self, steps_done: int) -> dict:
    now = time.perf_counter()
    result = {}
    if self.window_start is not None and steps_done > 0:
      step_s = (now - self.window_start) / steps_done
      result = {'step_ms': 1e3 * step_s, 'tokens_per_sec': self.tokens_per_step / step_s,
                'mfu': self.flops_per_step / step_s / self.peak}
    self.window_start = now
    return result


def _load_data(config, workdir):
  train_texts = lambda: pipeline.texts(config.data, config.data.train_split)
  tokenizer = tokenizers.for_run(config.tokenizer, workdir, train_texts)
  train_stream = pipeline.tokenize_split(config.data, tokenizer, config.data.train_split)
  eval_stream = pipeline.tokenize_split(config.data, tokenizer, config.data.eval_split)
  return tokenizer, train_stream, eval_stream


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains (or resumes) to `config.train.num_steps`; returns the final evaluation."""
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    config_lib.save(config, workdir)
  mesh = sharding.make_mesh(config.mesh)
  sharding.batch_size_check(config.train.batch_size, mesh)
  sharding.batch_size_check(config.train.eval_batch_size, mesh, 'train.eval_batch_size')
  seq_len, batch_size, num_steps = config.data.seq_len, config.train.batch_size, config.train.num_steps

  tokenizer, train_stream, eval_stream = _load_data(config, workdir)
  baseline = pipeline.unigram_entropy(train_stream.tokens, tokenizer.vocab_size)
  _log(f'corpus {config.data.name}: train {len(train_stream.tokens):,} tokens in '
       f'{train_stream.num_documents:,} documents, eval {len(eval_stream.tokens):,} tokens; '
       f'{tokenizer.kind} tokenizer, vocabulary {tokenizer.vocab_size}; '
       f'unigram entropy {baseline:.3f} nats/token')

  model = models.build_model(config.model, tokenizer.vocab_size, seq_len)
  tx, schedule = train_state.make_optimizer(config.optimizer, num_steps)
  abstract, state_shardings = train_state.abstract_state(model, tx, seq_len, mesh)
  checkpoints = checkpoint.manager(workdir, config.checkpoint)
  latest = checkpoints.latest_step()
  if latest is not None:
    checkpoint.check_tokenizer(checkpoints, latest, tokenizer)
    state = checkpoint.restore_state(checkpoints, latest, abstract)
    _log(f'resumed from checkpoint step {latest} in {checkpoint.directory(workdir)}')
  else:
    init_rng = jax.random.fold_in(jax.random.key(config.seed), 0)
    state, _ = train_state.create_state(model, tx, seq_len, mesh, init_rng)
  num_params = models.count_params(state.params)
  _log(f'model {config.model.family}: {num_params:,} parameters; mesh {dict(mesh.shape)} '
       f'on {jax.device_count()} {jax.devices()[0].platform} device(s)')

  batch_sharding = sharding.batch_sharding(mesh)
  replicated = sharding.replicated(mesh)
  train_step = jax.jit(
      functools.partial(steps.train_step, model=model, schedule=schedule,
                        deterministic=config.model.dropout == 0.0),
      in_shardings=(state_shardings, batch_sharding, replicated),
      out_shardings=(state_shardings, replicated), donate_argnums=0)
  eval_fn = evaluate.make_eval_fn(model, tokenizer, state_shardings.params, mesh)
  run_evaluation = functools.partial(evaluate.evaluate, eval_fn, seq_len=seq_len, mesh=mesh,
                                     batch_size=config.train.eval_batch_size)
  dropout_rng = jax.random.fold_in(jax.random.key(config.seed), 1)
  writer = metrics_lib.MetricWriter(workdir, enabled=jax.process_index() == 0)
  config_json = json.loads(config_lib.to_json(config))

  def save(step):
    checkpoint.save(checkpoints, step, state, config_json, tokenizer.to_json())

  start_step = int(jax.device_get(state.step))
  tokens_per_step = batch_size * seq_len
  progress = _Progress(tokens_per_step, metrics_lib.flops_per_token(model, num_params) *
                       tokens_per_step, metrics_lib.measure_peak_flops())
  batches = pipeline.train_batches(train_stream, seq_len, batch_size, config.seed, start_step,
                                   jax.process_index(), jax.process_count())
  last_step = min(num_steps, config.train.stop_at or num_steps)
  run_start = time.perf_counter()
  steps_in_window = 0
  for step in range(start_step, last_step):
    batch = sharding.make_global_batch(next(batches), mesh)
    with sharding.rules_and_mesh(mesh):
      state, step_metrics = train_step(state, batch, dropout_rng)
    progress.add(step, step_metrics)
    done = step + 1
    steps_in_window += 1
    if step == start_step:
      jax.block_until_ready(step_metrics)
      _log(f'step {done}: compiled and ran the first train step in '
           f'{time.perf_counter() - run_start:.1f}s')
      progress.throughput(0)
      steps_in_window = 0
    is_last = done == last_step
    record = {}
    if done % config.train.log_every == 0 or is_last:
      fetched = progress.fetch(keep_last=not is_last)
      speed = progress.throughput(steps_in_window)
      steps_in_window = 0
      if fetched:
        record.update({'train/loss': fetched['loss'], 'train/accuracy': fetched['accuracy'],
                       'train/grad_norm': fetched['grad_norm'],
                       'train/learning_rate': fetched['learning_rate']})
      record.update({f'perf/{k}': v for k, v in speed.items()})
      eta = speed.get('step_ms', 0.0) * (last_step - done) / 1e3
      if fetched:
        _log(f'step {done}/{num_steps} | loss {fetched["loss"]:.4f} | lr '
             f'{fetched["learning_rate"]:.2e} | {speed.get("tokens_per_sec", 0):,.0f} tok/s | '
             f'{speed.get("step_ms", 0):.1f} ms/step | MFU {100 * speed.get("mfu", 0):.1f}% | '
             f'ETA {_format_seconds(eta)}')
    if config.train.eval_every and done % config.train.eval_every == 0 and not is_last:
      result = run_evaluation(state.params, eval_stream, max_batches=config.train.eval_batches)
      record.update({f'eval/{k}': v for k, v in result.items()})
      _log(f'step {done}: eval loss {result["loss"]:.4f} | perplexity {result["perplexity"]:.2f}'
           f' | bits/byte {result["bits_per_byte"]:.3f} | accuracy {result["accuracy"]:.3f}')
      progress.throughput(0)
      steps_in_window = 0
    if done % config.checkpoint.every == 0 or is_last:
      progress.fetch(keep_last=False)  # Never save a state whose loss went non-finite.
      save(done)
    if record:
      writer.write(done, record)

  checkpoints.wait_until_finished()
  final_step = int(jax.device_get(state.step))
  if final_step > start_step:
    _log(f'trained steps {start_step + 1}..{final_step} in '
         f'{time.perf_counter() - run_start:.1f}s; checkpoint saved at step {final_step}')
  else:
    _log(f'already trained to step {final_step}; evaluating the latest checkpoint')
  result = run_evaluation(state.params, eval_stream, max_batches=config.train.final_eval_batches)
  result['unigram_entropy'] = baseline
  writer.write(final_step, {f'final_eval/{k}': v for k, v in result.items()})
  writer.close()
  _log(f'final eval ({config.data.eval_split}): loss {result["loss"]:.4f} | perplexity '
       f'{result["perplexity"]:.2f} | bits/byte {result["bits_per_byte"]:.3f} | accuracy '
       f'{result["accuracy"]:.3f} | {int(result["tokens"]):,} tokens '
       f'(unigram baseline {baseline:.3f})')
  if config.sample.max_new_tokens > 0:
    text = sample.sample_text(state.params, model, tokenizer, config.sample)[0]
    _log(f'--- sample (temperature {config.sample.temperature}, top-k {config.sample.top_k}) '
         f'---\n{text}\n---')
  checkpoints.close()
  return result


def _main(argv):
  from absl import flags, logging
  del argv
  if not flags.FLAGS['verbosity'].present:  # Orbax logs every save at INFO.
    logging.set_verbosity(logging.WARNING)
  flag_values = flags.FLAGS
  try:
    train_and_evaluate(flag_values.config, flag_values.workdir)
  except (config_lib.ConfigError, ValueError, checkpoint.CheckpointError,
          FloatingPointError) as error:
    print(f'error: {error}', file=sys.stderr)
    sys.exit(1)


def run():
  """Console entry point: checks --config.* keys before anything runs."""
  from absl import app, flags
  from ml_collections import config_flags
  try:
    config_lib.check_overrides(sys.argv[1:])
  except config_lib.ConfigError as error:
    sys.exit(f'error: {error}')
  config_flags.DEFINE_config_file('config', None, 'Config file (configs/x.py[:arg]).',
                                  lock_config=True)
  flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and the tokenizer.',
                      required=True)
  flags.mark_flags_as_required(['config'])
  app.run(_main)


if __name__ == '__main__':
  run()
