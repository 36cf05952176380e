"""The train loop: run a step, then the hooks due at it.

Each hook has its own cadence (Levanter's `Trainer.add_hook(fn, every=N)`,
big_vision's `itstime`): the progress line and metric record, evaluation, the
checkpoint, the preemption check and the profiler. The loop itself only feeds
batches to the step; the step counts as numbered in the log (1 is the first),
and a hook is called with the step it is for.

The record of step N holds the mean train metrics of steps N - log_every + 1 .. N
(so a resumed run logs what an uninterrupted one does) and is written once step
N + 1 is dispatched: the host never waits on the step in flight.
"""

import dataclasses
import os
import signal
import time
from collections.abc import Callable

import jax
import numpy as np

from lmjax import cpu_host
from lmjax import metrics as metrics_lib
from lmjax import sharding
from lmjax import watchdog


def log(message: str) -> None:
  if jax.process_index() == 0:
    print(message, flush=True)


def _format_seconds(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return (
    f'{seconds // 3600}h{seconds // 60 % 60:02d}m'
    if seconds >= 3600
    else (f'{seconds // 60}m{seconds % 60:02d}s')
  )


class Progress:
  """Metrics of finished steps, fetched to the host one step late, and throughput
  over a window of steps (numbered as the steps are: 1 is the first)."""

  def __init__(self, tokens_per_step: int, flops_per_step: float, peak_flops: float):
    self.tokens_per_step = tokens_per_step
    self.flops_per_step = flops_per_step
    self.peak = peak_flops
    self.pending = []  # (step, device metrics) not yet on the host
    self.finished = []  # host metrics since the last summary
    self.window_start = None  # time and step the speed window opened at
    self.window_step = 0

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
          f'loss or gradient is not finite at step {step} '
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

  def open_window(self, step: int) -> None:
    self.window_start, self.window_step = time.perf_counter(), step

  def throughput(self, step: int) -> dict:
    """Speed over the steps since the window opened, up to `step`; opens the next."""
    now, steps_done = time.perf_counter(), step - self.window_step
    result = {}
    if self.window_start is not None and steps_done > 0:
      step_s = (now - self.window_start) / steps_done
      result = {
        'step_ms': 1e3 * step_s,
        'tokens_per_sec': self.tokens_per_step / step_s,
        'mfu': self.flops_per_step / step_s / self.peak,
      }
    self.window_start, self.window_step = now, step
    return result


PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped on request with a checkpoint; rerun to resume.


class Preempted(Exception):
  """Training stopped at a SIGTERM after saving a checkpoint at `step`."""


class Pruned(Exception):
  """A sweep's pruner stopped the run at the evaluation of `step`, with a checkpoint there."""


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


@dataclasses.dataclass(frozen=True)
class Hook:
  """`fn(step)` after step `step` is dispatched, at the steps `due(step)` picks."""

  name: str
  due: Callable[[int], bool]
  fn: Callable[[int], None]


def every(n: int, last_step: int, at_last: bool) -> Callable[[int], bool]:
  """Every n-th step (n = 0: never); after the last step too, or never there."""
  return lambda step: (
    (step == last_step and at_last) or (n > 0 and step % n == 0 and (step != last_step or at_last))
  )


class Loop:
  """One run's steps from its state's step to the last, and the hooks between."""

  def __init__(
    self, run, writer: metrics_lib.MetricWriter, guard: watchdog.Watchdog, reporter=None
  ):
    """`reporter(step, eval record) -> stop?`: a sweep trial's (lmjax.sweep.TrialReporter)."""
    config = run.config
    self.run, self.writer, self.guard = run, writer, guard
    self.reporter = reporter
    self.last_step = min(run.derived.num_steps, config.train.stop_at or run.derived.num_steps)
    self.start_step = int(sharding.host_copy(run.state.step))
    shapes = run.task.batch_shapes(config, config.train.batch_size)
    self.progress = Progress(
      *metrics_lib.step_flops(run.model, run.num_params, shapes),
      metrics_lib.peak_flops(config.model.dtype)[0],
    )
    self.eval_records = {}  # step -> eval metrics, written with that step's train record
    self.evaluated = {}  # the last evaluation: {step: its metrics}
    self.saved_at = None  # the step of the last save
    self.tracing = False
    self.started = None
    self.hooks = self.default_hooks()

  def default_hooks(self) -> list[Hook]:
    train, last, start = self.run.config.train, self.last_step, self.start_step
    log_every = train.log_every
    profile_from, profile_to = start + 1, min(start + 1 + train.profile_steps, last)
    return [
      Hook('first step', lambda step: step == start + 1, self.first_step),
      # One step late: the record of step - 1, written once `step` is in flight.
      Hook('log', lambda step: step - 1 > start and (step - 1) % log_every == 0, self.log),
      Hook('evaluation', every(train.eval_every, last, at_last=False), self.evaluate),
      Hook('checkpoint', every(self.run.config.checkpoint.every, last, True), self.save),
      Hook(
        'sweep report',
        lambda step: self.reporter is not None and self.evaluated.get(step) is not None,
        self.report,
      ),
      Hook('preemption', lambda step: True, self.check_preemption),
      Hook(
        'profile start',
        lambda step: train.profile_steps > 0 and step == profile_from,
        self.start_trace,
      ),
      Hook('profile stop', lambda step: self.tracing and step == profile_to, self.stop_trace),
      Hook('last record', lambda step: step == last, self.last_record),
    ]

  def run_steps(self) -> tuple[int, float]:
    """Trains to the last step; returns (start step, seconds)."""
    run, config = self.run, self.run.config
    batches = run.train_batches(self.start_step)
    dropout_rng = jax.random.fold_in(jax.random.key(config.seed), 1)
    self.started = time.perf_counter()
    try:
      for step in range(self.start_step + 1, self.last_step + 1):
        first = 4 * config.train.phase_timeout_s if step == self.start_step + 1 else None
        with self.guard.phase('train step', step, first):  # the first step compiles
          batch = run.train_step.place(next(batches))
          run.state, metrics = cpu_host.settle(run.train_step(run.state, batch, dropout_rng))
        self.progress.add(step, metrics)
        for hook in self.hooks:
          if hook.due(step):
            hook.fn(step)
    finally:
      if self.tracing:
        jax.profiler.stop_trace()
    return self.start_step, time.perf_counter() - self.started

  # --------------------------------------------------------------------------
  # The hooks.

  def first_step(self, step: int) -> None:
    jax.block_until_ready(self.run.state)
    log(
      f'step {step}: compiled and ran the first train step in '
      f'{time.perf_counter() - self.started:.1f}s'
    )
    self.progress.open_window(step)

  def write(self, step: int, record: dict) -> None:
    self.writer.write(step, {**record, **self.eval_records.pop(step, {})})

  def log(self, step: int) -> None:
    with self.guard.phase('train step', step - 1):
      self.progress.fetch(keep_last=True)
    self.write(step - 1, self.train_record(step - 1))

  def last_record(self, step: int) -> None:
    with self.guard.phase('train step', step):
      self.progress.fetch(keep_last=False)
    self.write(step, self.train_record(step))

  def train_record(self, step: int) -> dict:
    """The train metrics and speed of the window ending at `step`; prints a progress line."""
    fetched = self.progress.summary()
    speed = self.progress.throughput(step)
    record = {f'perf/{k}': v for k, v in speed.items()}
    if fetched:
      record.update({f'train/{k}': v for k, v in fetched.items()})
      eta = speed.get('step_ms', 0.0) * (self.last_step - step) / 1e3
      log(
        f'step {step}/{self.last_step} | loss {fetched["loss"]:.4f} | lr '
        f'{fetched["learning_rate"]:.2e} | {speed.get("tokens_per_sec", 0):,.0f} tok/s | '
        f'{speed.get("step_ms", 0):.1f} ms/step | MFU {100 * speed.get("mfu", 0):.1f}% | '
        f'ETA {_format_seconds(eta)}'
      )
    return record

  def evaluate(self, step: int) -> None:
    run = self.run
    with self.guard.phase('train step', step):
      jax.block_until_ready(run.state)  # The step in flight is training time.
    start = time.perf_counter()
    with self.guard.phase('evaluation', step):
      result = run.evaluate(run.model_params(), run.config.train.eval_batches)
    self.eval_records[step] = {f'eval/{k}': v for k, v in result.items()}
    self.evaluated = {step: self.eval_records[step]}
    run.keep_if_best(step, result)
    log(f'step {step}: eval {run.task.describe(result)}')
    if step % run.config.train.log_every:  # no train record will carry it
      self.write(step, {})
    self.progress.exclude(time.perf_counter() - start)  # Evaluation is not training time.

  def save(self, step: int) -> None:
    with self.guard.phase('train step', step):
      self.progress.fetch(keep_last=False)  # Never save a state whose loss went non-finite.
    start = time.perf_counter()
    with self.guard.phase('save', step):
      self.run.save(step)
    self.saved_at = step
    self.progress.exclude(time.perf_counter() - start)

  def report(self, step: int) -> None:
    """The evaluation of `step` to the sweep; stops here, saved, if it prunes the run."""
    if not self.reporter(step, self.evaluated[step]):
      return
    if step in self.eval_records:  # not written yet: it goes out with no train record
      self.write(step, {})
    if self.saved_at != step:
      self.save(step)
    with self.guard.phase('save', step):
      self.run.finish_saves()
    log(f'pruned by the sweep at step {step}: saved a checkpoint at step {step}')
    raise Pruned(step)

  def check_preemption(self, step: int) -> None:
    with self.guard.phase('preemption check', step):
      if not preemption.reached(step, self.run.checkpoints):
        return
    if self.saved_at != step:
      self.save(step)
    with self.guard.phase('save', step):
      self.run.finish_saves()
    log(
      f'preempted (SIGTERM): saved a checkpoint at step {step}; exiting with status '
      f'{PREEMPTED_EXIT_CODE}; start the same command again to resume'
    )
    raise Preempted(step)

  def start_trace(self, step: int) -> None:
    """Traces the next train.profile_steps steps with jax.profiler, into the
    TensorBoard directory (its Profile tab shows them beside the metrics)."""
    jax.block_until_ready(self.run.state)
    jax.profiler.start_trace(os.path.join(self.run.workdir, 'tensorboard'))
    self.tracing = True

  def stop_trace(self, step: int) -> None:
    jax.block_until_ready(self.run.state)
    jax.profiler.stop_trace()
    self.tracing = False
    log(
      f'step {step}: profiled steps {self.start_step + 2}..{step} into '
      f'{os.path.join(self.run.workdir, "tensorboard", "plugins", "profile")}'
    )
