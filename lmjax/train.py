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
import sys
from typing import Any

import jax
from absl import app
from absl import flags

from lmjax import aot
from lmjax import checkpoint
from lmjax import config as config_lib
from lmjax import cpu_host
from lmjax import derived as derived_lib
from lmjax import distributed
from lmjax import finetune
from lmjax import fs
from lmjax import locks
from lmjax import loop
from lmjax import metrics as metrics_lib
from lmjax import models
from lmjax import sample
from lmjax import sharding
from lmjax import steps
from lmjax import storage
from lmjax import sweep
from lmjax import tasks
from lmjax import train_state
from lmjax import validation
from lmjax import watchdog
from lmjax.data import tokenizers


def load_data(config, workdir, task: tasks.Task | None = None):
  """(tokenizer, task data, pre-training run or None). Fine-tuning takes the
  pre-trained tokenizer; otherwise the workdir's, or a new one."""
  task = task or tasks.get(config.task)
  pretrained = None
  if config.init_from:
    pretrained = finetune.open_pretrained(config.init_from, loop.log)
    finetune.check_tokenizer_config(pretrained, config.tokenizer)
  train_texts = lambda: task.train_texts(config)
  tokenizer = tokenizers.for_run(
    config.tokenizer, workdir, train_texts, pretrained.tokenizer if pretrained else None
  )
  return tokenizer, task.load(config, tokenizer), pretrained


@dataclasses.dataclass
class Run:
  """Everything a training run wires together, built once by `setup`."""

  config: Any  # as validated; never written to (what the data decides is in `derived`)
  derived: derived_lib.Derived
  task: tasks.Task
  workdir: str
  mesh: Any
  tokenizer: Any
  data: tasks.TaskData
  model: Any
  state: Any  # in the train step's layout (a pmap run: one replica per device)
  checkpoints: Any
  train_step: Any  # steps.MeshStep or steps.PmapStep
  evaluate: Any  # (params, max_batches) -> metrics
  num_params: int
  plan: Any = None  # finetune.Plan when fine-tuning
  best_loss: float = float('inf')  # of the checkpoint kept in checkpoints_best/

  def train_batches(self, start_step: int):
    """This process' rows of the batches of steps start_step + 1, ..."""
    return self.task.train_batches(self.config, self.data, start_step)

  def model_params(self):
    """The parameters the model runs with (LoRA: adapters merged into the frozen
    pre-trained weights)."""
    state = self.global_state()
    if self.plan is None or state.frozen is None:
      return state.params
    return cpu_host.settle(_jit_assemble(self.plan)(state.params, state.frozen))

  def global_state(self):
    """The state as global arrays on the mesh, whatever the step's layout."""
    return self.train_step.global_state(self.state)

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
    """Saves `step` (state, config, derived record, tokenizer) to `checkpoints`
    (the run's manager). Saves are asynchronous: a failure of the one before
    surfaces here."""
    checkpoints = checkpoints or self.checkpoints
    with checkpoint.save_errors(checkpoints, step):
      checkpoint.save(
        checkpoints,
        step,
        self.global_state().replace(frozen=None),  # LoRA: the base is init_from's
        json.loads(config_lib.to_json(self.config)),
        self.derived,
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

    restored = checkpoint.resume_point(workdir, read, loop.log)
    checkpoints.reload()  # damaged steps may have been moved aside
  if restored is not None:
    latest, state = restored
    if abstract.frozen is not None:  # LoRA: every pre-trained parameter is frozen
      state = state.replace(frozen=finetune.nest(plan.prefix, backbone))
    loop.log(f'resumed from checkpoint step {latest} in {checkpoint.directory(workdir)}')
  else:
    init_rng = jax.random.fold_in(jax.random.key(config.seed), 0)
    state = train_state.create_state(
      model, tx, seq_len, state_shardings, init_rng, carry_rows, plan, backbone
    )
    if pretrained is not None:
      loop.log(f'fine-tuning ({plan.mode}) from {pretrained.describe()}')
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
  """Config -> mesh, data, tokenizer, derived record, model, (restored) state and
  the jitted steps. The config is only read."""
  validation.check(config)  # before any I/O (cheap; callers may have checked already)
  task = tasks.get(config.task)
  enable_compilation_cache(config.compilation_cache_dir)
  fs.makedirs(workdir)
  if jax.process_index() == 0:
    config_lib.save(config, workdir)
  mesh = sharding.make_mesh(config.mesh)
  sharding.batch_size_check(config.train.batch_size, mesh)
  sharding.batch_size_check(config.train.eval_batch_size, mesh, 'train.eval_batch_size')
  tokenizer, data, pretrained = load_data(config, workdir, task)
  record = task.derive(config, tokenizer, data)
  loop.log(
    f'corpus {config.data.name}: {data.description}; {tokenizer.kind} tokenizer, '
    f'vocabulary {tokenizer.vocab_size}; {task.baseline_name} {data.baseline:.3f}'
  )
  if config.train.num_epochs > 0:
    loop.log(
      f'{config.train.num_epochs} epochs of {record.steps_per_epoch} steps: '
      f'{record.num_steps} steps'
    )
  if jax.process_index() == 0:
    record.save(workdir)
  model = task.build_model(config, record)
  tx, schedule, plan = finetune.optimizer_and_plan(config, model, record)
  carry_rows = train_state.carry_rows(config, model)
  model_params = train_state.abstract_params(model, config.data.seq_len, mesh)
  state, state_shardings, checkpoints = _restore_or_create_state(
    config, workdir, model, tx, mesh, tokenizer, model_params, carry_rows, pretrained, plan
  )
  num_params = models.count_params(model_params)
  loop.log(
    f'model {config.model.family} ({config.task}): {num_params:,} parameters, '
    f'{trainable_count(state, plan):,} trainable; mesh {dict(mesh.shape)} on '
    f'{jax.device_count()} {jax.devices()[0].platform} device(s)'
  )
  state, train_step = steps.build_train_step(
    config, model, schedule, state, state_shardings, mesh, plan, carry_rows
  )
  param_shardings = jax.tree.map(lambda leaf: leaf.sharding, model_params)
  carry_eval = carry_rows > 0  # evaluate as it was trained
  evaluator = task.make_evaluator(
    config, record, data, model, tokenizer, param_shardings, mesh, carry_eval
  )
  return Run(
    config=config,
    derived=record,
    task=task,
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
    loop.preemption.install()
    with guard:
      return _train_and_evaluate(config, workdir, guard)
  finally:
    lock.release()


def _train_and_evaluate(config, workdir: str, guard: watchdog.Watchdog) -> dict:
  run = setup(config, workdir)  # unbounded: preparing data may take long
  writer = metrics_lib.MetricWriter(workdir, enabled=jax.process_index() == 0)
  reporter = sweep.TrialReporter.from_environment()  # in a sweep's trial
  try:
    start_step, seconds = loop.Loop(run, writer, guard, reporter).run_steps()
  except (loop.Preempted, loop.Pruned):
    writer.close()
    run.checkpoints.close()
    raise
  final_step = int(sharding.host_copy(run.state.step))
  with guard.phase('save', final_step):
    run.finish_saves()
  if final_step > start_step:
    loop.log(
      f'trained steps {start_step + 1}..{final_step} in {seconds:.1f}s; checkpoint saved '
      f'at step {final_step}'
    )
  else:
    loop.log(f'already trained to step {final_step}; evaluating the latest checkpoint')
  with guard.phase('final evaluation', final_step):
    params = run.model_params()
    result = run.evaluate(params, config.train.final_eval_batches)
  result[run.task.baseline_key] = run.data.baseline
  writer.write(final_step, {f'final_eval/{k}': v for k, v in result.items()})
  writer.close()
  loop.log(
    f'final eval ({config.data.eval_split}): {run.task.describe(result)} '
    f'({run.task.baseline_name} {run.data.baseline:.3f})'
  )
  if config.sample.max_new_tokens > 0 and run.task.generates_text:
    with guard.phase('sampling', final_step):
      text = sample.sample_text(
        params, run.model, run.tokenizer, config.sample, clean_config=config.data.clean
      )[0]
    loop.log(
      f'--- sample (temperature {config.sample.temperature}, top-k {config.sample.top_k}) '
      f'---\n{text}\n---'
    )
  run.checkpoints.close()
  return result


def _main(argv):
  del argv
  checkpoint.quiet_logs()
  flag_values = flags.FLAGS
  if flag_values.topology and 'JAX_PLATFORMS' not in os.environ:
    jax.config.update('jax_platforms', 'cpu')  # compiling for a slice needs no local TPU
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
      report = aot.compile_report(flag_values.config, flag_values.topology)
      print(json.dumps(report, indent=2))
      return
    train_and_evaluate(flag_values.config, flag_values.workdir)
  except loop.Preempted:
    sys.exit(loop.PREEMPTED_EXIT_CODE)
  except loop.Pruned:
    sys.exit(sweep.PRUNED_EXIT_CODE)
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
    'Lower and compile the train step and the decode loop for the configured '
    'mesh without data or a run; print per-chip memory, FLOPs and fit as JSON.',
  )
  flags.DEFINE_string(
    'topology',
    '',
    f'With --compile_only: compile for {aot.TOPOLOGY_HELP} (needs libtpu, on any machine).',
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
