"""Training: the loop that wires data, model, steps, metrics and checkpoints.

    python -m lmjax.train --config configs/default.py --workdir /tmp/run \
        [--config.train.num_steps=500 ...]

Started again with the same workdir, a run resumes from its latest checkpoint
and continues the same loss curve (the data order and dropout randomness are
functions of the step).
"""

import dataclasses
import functools
import json
import os
import signal
import sys
import time
from typing import Any

import jax
import numpy as np
from absl import app
from absl import flags

from lmjax import checkpoint
from lmjax import config as config_lib
from lmjax import cpu_host
from lmjax import distributed
from lmjax import finetune
from lmjax import fs
from lmjax import locks
from lmjax import metrics as metrics_lib
from lmjax import models
from lmjax import sample
from lmjax import sharding
from lmjax import steps
from lmjax import storage
from lmjax import tasks
from lmjax import train_state
from lmjax import validation
from lmjax import watchdog
from lmjax.data import pipeline
from lmjax.data import tokenizers


def _log(message: str) -> None:
  if jax.process_index() == 0:
    print(message, flush=True)


def _format_seconds(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return (
    f'{seconds // 3600}h{seconds // 60 % 60:02d}m'
    if seconds >= 3600
    else (f'{seconds // 60}m{seconds % 60:02d}s')
  )


class _Progress:
  """Metrics of finished steps, fetched to the host one step late, and throughput."""

  def __init__(self, tokens_per_step: int, flops_per_step: float, peak_flops: float):
    self.tokens_per_step, self.flops_per_step, self.peak = (
      tokens_per_step,
      flops_per_step,
      peak_flops,
    )
    self.pending = []  # (step, device metrics) not yet on the host
    self.finished = []  # host metrics since the last summary
    self.window_start = None

  def add(self, step: int, device_metrics) -> None:
    self.pending.append((step, device_metrics))

  def fetch(self, keep_last: bool = True) -> None:
    """Moves pending metrics to the host (all, or all but the step in flight)
    and stops loudly if a loss or gradient went non-finite."""
    ready = self.pending[:-1] if keep_last else self.pending
    self.pending = self.pending[-1:] if keep_last else []
    for (step, _), m in zip(ready, jax.device_get([m for _, m in ready])):
      if not np.isfinite(m['loss_sum']) or not np.isfinite(m['grad_norm']):
        raise FloatingPointError(
          f'loss or gradient is not finite at step {step + 1} '
          f'(loss_sum={m["loss_sum"]}, grad_norm={m["grad_norm"]}); '
          'stopping without saving a checkpoint'
        )
      self.finished.append(m)

  def summary(self) -> dict | None:
    """Means over the fetched steps since the last summary."""
    values, self.finished = self.finished, []
    if not values:
      return None
    sums = {k: sum(float(m[k]) for m in values) for k in ('loss_sum', 'correct_sum', 'weight_sum')}
    return {
      'loss': sums['loss_sum'] / max(sums['weight_sum'], 1.0),
      'accuracy': sums['correct_sum'] / max(sums['weight_sum'], 1.0),
      'grad_norm': float(values[-1]['grad_norm']),
      'learning_rate': float(values[-1]['learning_rate']),
    }

  def exclude(self, seconds: float) -> None:
    """Leaves `seconds` (an evaluation, a save) out of the current speed window."""
    if self.window_start is not None:
      self.window_start += seconds

  def throughput(self, steps_done: int) -> dict:
    now = time.perf_counter()
    result = {}
    if self.window_start is not None and steps_done > 0:
      step_s = (now - self.window_start) / steps_done
      result = {
        'step_ms': 1e3 * step_s,
        'tokens_per_sec': self.tokens_per_step / step_s,
        'mfu': self.flops_per_step / step_s / self.peak,
      }
    self.window_start = now
    return result


def load_data(config, workdir):
  """(tokenizer, task data, pre-training run or None). Fine-tuning takes the
  pre-trained tokenizer; otherwise the workdir's, or a new one."""
  pretrained = None
  if config.init_from:
    pretrained = finetune.open_pretrained(config.init_from, _log)
    finetune.check_tokenizer_config(pretrained, config.tokenizer)
  train_texts = lambda: pipeline.texts(config.data, config.data.train_split)
  tokenizer = tokenizers.for_run(
    config.tokenizer, workdir, train_texts, pretrained.tokenizer if pretrained else None
  )
  return tokenizer, tasks.load(config, tokenizer), pretrained


@dataclasses.dataclass
class Run:
  """Everything a training run wires together, built once by `setup`."""

  config: Any
  workdir: str
  mesh: Any
  tokenizer: Any
  data: tasks.TaskData
  model: Any
  state: Any
  checkpoints: Any
  train_step: Any  # jitted (state, batch, rng) -> (state, metrics)
  evaluate: Any  # (params, max_batches) -> metrics
  num_params: int
  state_shardings: Any
  plan: Any = None  # finetune.Plan when fine-tuning
  best_loss: float = float('inf')  # of the checkpoint kept in checkpoints_best/

  def model_params(self):
    """The parameters the model runs with (LoRA: adapters merged into the frozen
    pre-trained weights)."""
    state = self.global_state()
    if self.plan is None or state.frozen is None:
      return state.params
    return cpu_host.settle(_jit_assemble(self.plan)(state.params, state.frozen))

  def global_state(self):
    """The state as global arrays on the mesh (a pmap run keeps a replicated copy
    per device; checkpoints, evaluation and sampling take this layout)."""
    if self.config.parallelism != 'pmap':
      return self.state
    return jax.device_put(sharding.host_copy(self.state), self.state_shardings)

  def keep_if_best(self, step: int, result: dict) -> None:
    """Saves `step` apart (WORKDIR/checkpoints_best) if its evaluation is the best yet."""
    if not self.config.checkpoint.keep_best or not result['loss'] < self.best_loss:
      return
    self.best_loss = result['loss']
    best = checkpoint.best_manager(self.workdir)
    self.save(step, best, metrics=result)
    with checkpoint.save_errors(best, step):
      best.wait_until_finished()
    best.close()

  def save(self, step: int, checkpoints=None, metrics: dict | None = None) -> None:
    """Saves `step` (state, config, tokenizer) to `checkpoints` (the run's manager).
    Saves are asynchronous: a failure of the one before surfaces here."""
    checkpoints = checkpoints or self.checkpoints
    with checkpoint.save_errors(checkpoints, step):
      checkpoint.save(
        checkpoints,
        step,
        self.global_state().replace(frozen=None),  # LoRA: the base is init_from's
        json.loads(config_lib.to_json(self.config)),
        self.tokenizer.to_json(),
        metrics=metrics,
      )

  def finish_saves(self) -> None:
    """Waits for the asynchronous save in flight; its failure is a clear error."""
    with checkpoint.save_errors(self.checkpoints, self.checkpoints.latest_step()):
      self.checkpoints.wait_until_finished()


@functools.cache
def _jit_assemble(plan):
  return jax.jit(plan.assemble)


def _restore_or_create_state(
  config, workdir, model, tx, mesh, tokenizer, model_params, carry_rows, pretrained=None, plan=None
):
  """The latest checkpoint's state, or a new one (fine-tuning: built around the
  pre-trained parameters, read into the shardings of `model_params`, the model's
  abstract parameters). A LoRA run reads its frozen base from init_from again."""
  seq_len = config.data.seq_len
  abstract, state_shardings = train_state.abstract_state(model, tx, seq_len, mesh, carry_rows, plan)
  backbone = None
  if pretrained is not None:
    backbone = finetune.restore_backbone(pretrained, finetune.subtree(model_params, plan.prefix))
  checkpoints = checkpoint.manager(workdir, config.checkpoint)
  restored = None
  if checkpoints.all_steps():

    def read(candidates, step):
      checkpoint.check_tokenizer(candidates, step, tokenizer)
      return checkpoint.restore_state(candidates, step, abstract.replace(frozen=None))

    restored = checkpoint.resume_point(workdir, read, _log)
    checkpoints.reload()  # damaged steps may have been moved aside
  if restored is not None:
    latest, state = restored
    if abstract.frozen is not None:  # LoRA: every pre-trained parameter is frozen
      state = state.replace(frozen=finetune.nest(plan.prefix, backbone))
    _log(f'resumed from checkpoint step {latest} in {checkpoint.directory(workdir)}')
  else:
    init_rng = jax.random.fold_in(jax.random.key(config.seed), 0)
    state = train_state.create_state(
      model, tx, seq_len, state_shardings, init_rng, carry_rows, plan, backbone
    )
    if pretrained is not None:
      _log(f'fine-tuning ({plan.mode}) from {pretrained.describe()}')
  return state, state_shardings, checkpoints


def enable_compilation_cache(directory: str) -> None:
  """Persists every compiled program under `directory` (local or gs://), so the next
  run with the same shapes loads it instead of compiling again."""
  if not directory:
    return
  directory = os.path.expanduser(directory)
  jax.config.update('jax_compilation_cache_dir', directory)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


def setup(config, workdir: str) -> Run:
  """Config -> mesh, data, tokenizer, model, (restored) state and jitted steps."""
  validation.check(config)  # before any I/O (cheap; callers may have checked already)
  enable_compilation_cache(config.compilation_cache_dir)
  fs.makedirs(workdir)
  if jax.process_index() == 0:
    config_lib.save(config, workdir)
  mesh = sharding.make_mesh(config.mesh)
  sharding.batch_size_check(config.train.batch_size, mesh)
  sharding.batch_size_check(config.train.eval_batch_size, mesh, 'train.eval_batch_size')
  tokenizer, data, pretrained = load_data(config, workdir)
  _log(
    f'corpus {config.data.name}: {data.description}; {tokenizer.kind} tokenizer, '
    f'vocabulary {tokenizer.vocab_size}; {data.baseline_name} {data.baseline:.3f}'
  )

  per_epoch = data.steps_per_epoch(config)
  if config.train.num_epochs > 0:
    config.train.num_steps = config.train.num_epochs * per_epoch
    _log(f'{config.train.num_epochs} epochs of {per_epoch} steps: {config.train.num_steps} steps')
  if jax.process_index() == 0:  # with what the data decided (epochs, classes)
    config_lib.save(config, workdir)
  model = tasks.build_model(config, tokenizer)
  tx, schedule, plan = finetune.optimizer_and_plan(config, model, per_epoch)
  carry_rows = train_state.carry_rows(config, model)
  model_params = train_state.abstract_params(model, config.data.seq_len, mesh)
  state, state_shardings, checkpoints = _restore_or_create_state(
    config, workdir, model, tx, mesh, tokenizer, model_params, carry_rows, pretrained, plan
  )
  num_params = models.count_params(model_params)
  _log(
    f'model {config.model.family} ({config.task}): {num_params:,} parameters, '
    f'{trainable_count(state, plan):,} trainable; mesh {dict(mesh.shape)} on '
    f'{jax.device_count()} {jax.devices()[0].platform} device(s)'
  )

  state, train_step = steps.build_train_step(
    config,
    model,
    schedule,
    state,
    state_shardings,
    mesh,
    plan,
    carry_rows,
  )
  param_shardings = jax.tree.map(lambda leaf: leaf.sharding, model_params)
  carry_eval = carry_rows > 0  # evaluate as it was trained
  evaluator = tasks.make_evaluator(
    config, data, model, tokenizer, param_shardings, mesh, carry_eval
  )
  return Run(
    config=config,
    workdir=workdir,
    mesh=mesh,
    tokenizer=tokenizer,
    data=data,
    model=model,
    state=state,
    checkpoints=checkpoints,
    train_step=train_step,
    evaluate=evaluator,
    num_params=num_params,
    state_shardings=state_shardings,
    plan=plan,
    best_loss=checkpoint.best_loss(workdir),
  )


def trainable_count(state, plan) -> int:
  """Parameters the optimizer changes (LoRA: adapters and new ones; frozen: new ones)."""
  if plan is None or plan.mode == 'full':
    return models.count_params(state.params)
  return sum(
    int(leaf.size)
    for name, leaf in finetune.flatten(state.params).items()
    if not plan.is_pretrained(name)
  )


def compile_only(config) -> dict:
  """Lowers and compiles the train step for the configured mesh, from shapes alone
  (no data, no parameters allocated), and reports its per-device memory: will
  the model fit before the pod is rented? The vocabulary is 257 for bytes and
  tokenizer.vocab_size otherwise."""
  validation.check(config)
  mesh = sharding.make_mesh(config.mesh)
  sharding.batch_size_check(config.train.batch_size, mesh)
  vocab = 257 if config.tokenizer.kind == 'bytes' else config.tokenizer.vocab_size
  seq_len, batch_size = config.data.seq_len, config.train.batch_size
  if config.task == 'classify' and not config.classify.num_classes:
    raise ValueError('--compile_only of a classifier needs --config.classify.num_classes')
  model = tasks.build_model(config, vocab)
  tx, schedule = train_state.make_optimizer(
    config.optimizer, config.train.num_steps, steps_per_epoch=1
  )  # shapes only
  carry_rows = train_state.carry_rows(config, model)
  abstract, shardings = train_state.abstract_state(model, tx, seq_len, mesh, carry_rows)
  batch_sharding = sharding.batch_sharding(mesh)
  batch = {
    name: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding)
    for name, (shape, dtype) in tasks.batch_shapes(config, batch_size).items()
  }
  start = time.perf_counter()
  with sharding.rules_and_mesh(mesh):
    compiled = (
      steps.jit_train_step(steps.make_train_step(config, model, schedule), shardings, mesh)
      .lower(abstract, batch, jax.random.key(0))
      .compile()
    )
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()

  def per_device_bytes(tree):
    return int(
      sum(
        np.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
        for leaf in jax.tree.leaves(tree)
      )
    )

  gib = lambda n: round(n / 2**30, 4)
  report = {
    'mesh': dict(mesh.shape),
    'devices': jax.device_count(),
    'platform': jax.devices()[0].platform,
    'vocab_size': vocab,
    'params': models.count_params(abstract.params),
    'compile_s': round(compile_s, 2),
    'per_device_gib': {
      'params': gib(per_device_bytes(abstract.params)),
      'optimizer_state': gib(per_device_bytes(abstract.opt_state)),
    },
  }
  if memory is not None:
    report['per_device_gib'].update(
      {
        'arguments': gib(memory.argument_size_in_bytes),
        'outputs': gib(memory.output_size_in_bytes),
        'temporaries': gib(memory.temp_size_in_bytes),
        'aliased': gib(memory.alias_size_in_bytes),
        'peak_estimate': gib(
          memory.argument_size_in_bytes
          + memory.output_size_in_bytes
          + memory.temp_size_in_bytes
          - memory.alias_size_in_bytes
        ),
      }
    )
  return report


def _train_record(progress: _Progress, step: int, last_step: int, steps_timed: int) -> dict:
  """The train metrics and speed of the window ending at `step`; prints a progress line."""
  fetched = progress.summary()
  speed = progress.throughput(steps_timed)
  record = {f'perf/{k}': v for k, v in speed.items()}
  if fetched:
    record.update(
      {
        'train/loss': fetched['loss'],
        'train/accuracy': fetched['accuracy'],
        'train/grad_norm': fetched['grad_norm'],
        'train/learning_rate': fetched['learning_rate'],
      }
    )
    eta = speed.get('step_ms', 0.0) * (last_step - step) / 1e3
    _log(
      f'step {step}/{last_step} | loss {fetched["loss"]:.4f} | lr '
      f'{fetched["learning_rate"]:.2e} | {speed.get("tokens_per_sec", 0):,.0f} tok/s | '
      f'{speed.get("step_ms", 0):.1f} ms/step | MFU {100 * speed.get("mfu", 0):.1f}% | '
      f'ETA {_format_seconds(eta)}'
    )
  return record


PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped on request with a checkpoint; rerun to resume.


class Preempted(Exception):
  """Training stopped at a SIGTERM after saving a checkpoint at `step`."""


class _Preemption:
  """Has a preemption notice (SIGTERM) arrived? Single process: our own SIGTERM
  handler sets a flag, read after each step (the step in flight finishes first).
  Multi-process: Orbax's preemption sync point (JAX's coordination service),
  which makes every process agree on the same step to save at."""

  def __init__(self):
    self.flag = False

  def install(self) -> None:
    if jax.process_count() == 1:
      signal.signal(signal.SIGTERM, lambda signum, frame: setattr(self, 'flag', True))

  def reached(self, step: int, checkpoints) -> bool:
    if jax.process_count() == 1:
      return self.flag
    return bool(checkpoints.reached_preemption(step))


preemption = _Preemption()


def _train(
  run: Run, writer: metrics_lib.MetricWriter, guard: watchdog.Watchdog
) -> tuple[int, float]:
  """Runs the steps from the state's step to the last one; returns (start step, seconds).

  The record of step N holds the mean train metrics of steps N - log_every + 1 .. N
  (so a resumed run logs what an uninterrupted one does) and is written once step
  N + 1 is dispatched: the host never waits on the step in flight.
  """
  config, mesh = run.config, run.mesh
  seq_len, batch_size, log_every = (
    config.data.seq_len,
    config.train.batch_size,
    config.train.log_every,
  )
  last_step = min(config.train.num_steps, config.train.stop_at or config.train.num_steps)
  start_step = int(sharding.host_copy(run.state.step))
  tokens_per_step = batch_size * seq_len
  progress = _Progress(
    tokens_per_step,
    metrics_lib.flops_per_token(run.model, run.num_params) * tokens_per_step,
    metrics_lib.measure_peak_flops(),
  )
  batches = run.data.train_batches(config, start_step)
  dropout_rng = jax.random.fold_in(jax.random.key(config.seed), 1)
  eval_records = {}  # step -> eval metrics, written with that step's train record
  run_start = time.perf_counter()
  steps_timed = 0

  def write(step, record):
    writer.write(step, {**record, **eval_records.pop(step, {})})

  pmap = config.parallelism == 'pmap'
  for step in range(start_step, last_step):
    first = 4 * config.train.phase_timeout_s if step == start_step else None  # compiles
    with guard.phase('train step', step + 1, first):
      batch = next(batches) if pmap else sharding.make_global_batch(next(batches), mesh)
      with sharding.rules_and_mesh(None if pmap else mesh):
        run.state, step_metrics = cpu_host.settle(run.train_step(run.state, batch, dropout_rng))
    progress.add(step, step_metrics)
    done, is_last = step + 1, step + 1 == last_step
    steps_timed += 1
    if step == start_step:
      jax.block_until_ready(step_metrics)
      _log(
        f'step {done}: compiled and ran the first train step in '
        f'{time.perf_counter() - run_start:.1f}s'
      )
      progress.throughput(0)
      steps_timed = 0
    if step > start_step and step % log_every == 0:  # Step `step` has finished: log it.
      with guard.phase('train step', step):
        progress.fetch(keep_last=True)
      write(step, _train_record(progress, step, last_step, steps_timed - 1))
      steps_timed = 1
    if config.train.eval_every and done % config.train.eval_every == 0 and not is_last:
      with guard.phase('train step', done):
        jax.block_until_ready(run.state)  # The step in flight is training time.
      eval_start = time.perf_counter()
      with guard.phase('evaluation', done):
        result = run.evaluate(run.model_params(), config.train.eval_batches)
      eval_records[done] = {f'eval/{k}': v for k, v in result.items()}
      run.keep_if_best(done, result)
      _log(f'step {done}: eval {tasks.describe(result)}')
      if done % log_every:
        write(done, {})
      progress.exclude(time.perf_counter() - eval_start)  # Evaluation is not training time.
    with guard.phase('preemption check', done):
      preempted = preemption.reached(done, run.checkpoints)
    if done % config.checkpoint.every == 0 or is_last or preempted:
      with guard.phase('train step', done):
        progress.fetch(keep_last=False)  # Never save a state whose loss went non-finite.
      save_start = time.perf_counter()
      with guard.phase('save', done):
        run.save(done)
      progress.exclude(time.perf_counter() - save_start)
    if preempted:
      with guard.phase('save', done):
        run.finish_saves()
      _log(
        f'preempted (SIGTERM): saved a checkpoint at step {done}; exiting with status '
        f'{PREEMPTED_EXIT_CODE}; start the same command again to resume'
      )
      raise Preempted(done)
  if last_step > start_step:
    with guard.phase('train step', last_step):
      progress.fetch(keep_last=False)
    write(last_step, _train_record(progress, last_step, last_step, steps_timed))
  return start_step, time.perf_counter() - run_start


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains (or resumes) to `config.train.num_steps` (or `stop_at`), then evaluates the
  whole evaluation split and prints a sample; returns the final evaluation. Process 0
  holds the workdir's lock (WORKDIR/lock) throughout: a second run on the same
  workdir is refused with locks.LockError naming the holder."""
  validation.check(config)  # before any I/O
  lock = locks.Lock(fs.absolute(workdir), 'lock', 'another training run')
  if jax.process_index() == 0:
    lock.acquire()
  guard = watchdog.Watchdog(config.train.phase_timeout_s, config.train.sigterm_grace_s)
  try:
    preemption.install()
    with guard:
      return _train_and_evaluate(config, workdir, guard)
  finally:
    lock.release()


def _train_and_evaluate(config, workdir: str, guard: watchdog.Watchdog) -> dict:
  run = setup(config, workdir)  # unbounded: preparing data may take long
  writer = metrics_lib.MetricWriter(workdir, enabled=jax.process_index() == 0)
  try:
    start_step, seconds = _train(run, writer, guard)
  except Preempted:
    writer.close()
    run.checkpoints.close()
    raise
  final_step = int(sharding.host_copy(run.state.step))
  with guard.phase('save', final_step):
    run.finish_saves()
  run.state = run.global_state()
  if final_step > start_step:
    _log(
      f'trained steps {start_step + 1}..{final_step} in {seconds:.1f}s; checkpoint saved '
      f'at step {final_step}'
    )
  else:
    _log(f'already trained to step {final_step}; evaluating the latest checkpoint')
  with guard.phase('final evaluation', final_step):
    params = run.model_params()
    result = run.evaluate(params, config.train.final_eval_batches)
  result[run.data.baseline_key] = run.data.baseline
  writer.write(final_step, {f'final_eval/{k}': v for k, v in result.items()})
  writer.close()
  _log(
    f'final eval ({config.data.eval_split}): {tasks.describe(result)} '
    f'({run.data.baseline_name} {run.data.baseline:.3f})'
  )
  if config.sample.max_new_tokens > 0 and config.task == 'lm':
    with guard.phase('sampling', final_step):
      text = sample.sample_text(
        params, run.model, run.tokenizer, config.sample, clean_config=config.data.clean
      )[0]
    _log(
      f'--- sample (temperature {config.sample.temperature}, top-k {config.sample.top_k}) '
      f'---\n{text}\n---'
    )
  run.checkpoints.close()
  return result


def _main(argv):
  del argv
  checkpoint.quiet_logs()
  flag_values = flags.FLAGS
  try:
    multi_process = (
      distributed.settings(
        flag_values.coordinator_address, flag_values.num_processes, flag_values.process_id
      )
      is not None
    )
    validation.check(flag_values.config)  # a typo is the first thing a run says
    cpu_host.prepare(flag_values.config, multi_process)
    distributed.initialize_from_flags()
    if flag_values.compile_only:
      print(json.dumps(compile_only(flag_values.config), indent=2))
      return
    train_and_evaluate(flag_values.config, flag_values.workdir)
  except Preempted:
    sys.exit(PREEMPTED_EXIT_CODE)
  except (
    config_lib.ConfigError,
    ValueError,
    *checkpoint.ERRORS,
    locks.LockError,
    FloatingPointError,
    distributed.DistributedError,
    OSError,
  ) as error:
    if not storage.is_disk_full(error) and isinstance(error, OSError):
      raise
    print(f'error: {checkpoint.describe_failure(error, flag_values.workdir)}', file=sys.stderr)
    sys.exit(1)


def run():
  """Console entry point: checks --config.* keys before anything runs."""
  config_lib.define_config_flag()
  flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and the tokenizer.')
  flags.DEFINE_bool(
    'compile_only',
    False,
    'Lower and compile the train step for the configured '
    'mesh without data or a run; print its per-device memory as JSON.',
  )
  distributed.define_flags()
  flags.mark_flags_as_required(['config'])
  flags.register_multi_flags_validator(
    ['workdir', 'compile_only'],
    lambda v: bool(v['workdir']) or v['compile_only'],
    message='--workdir is required (except with --compile_only)',
  )
  app.run(_main)


if __name__ == '__main__':
  run()
