"""Orbax checkpoints: one self-contained directory per step.

Layout (`WORKDIR/checkpoints/<step>/`), as Orbax items:
  state/      the TrainState pytree {step, params, opt_state} (StandardSave)
  config/     the resolved config (JSON)
  tokenizer/  the tokenizer, model included (JSON; see lmjax.data.tokenizers)

Resume order: the tokenizer is checked first (it fixes the vocabulary), then
the parameter shapes against the configured model, then the state is restored
straight into its sharded layout.
"""
import os

import jax
import orbax.checkpoint as ocp

from lmjax import fs
from lmjax.data import tokenizers

ITEMS = ('state', 'config', 'tokenizer')


def quiet_logs() -> None:
  """Orbax logs every save and restore at INFO: command-line tools show warnings
  and errors only, unless --verbosity asks for more."""
  from absl import flags, logging
  if 'verbosity' not in flags.FLAGS or not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)


class CheckpointError(RuntimeError):
  """A checkpoint that is missing, corrupt or does not fit the run."""


def directory(workdir: str) -> str:
  return os.path.join(fs.absolute(workdir), 'checkpoints')


def manager(workdir: str, checkpoint_config=None, read_only: bool = False) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=checkpoint_config.keep if checkpoint_config else None,
      enable_async_checkpointing=bool(checkpoint_config and checkpoint_config.async_save),
      create=not read_only, read_only=read_only)
  handlers = {'state': ocp.StandardCheckpointHandler(), 'config': ocp.JsonCheckpointHandler(),
              'tokenizer': ocp.JsonCheckpointHandler()}
  return ocp.CheckpointManager(directory(workdir), options=options, item_handlers=handlers)


def save(checkpoints: ocp.CheckpointManager, step: int, state, config_json: dict,
         tokenizer_json: dict, metrics: dict | None = None) -> None:
  items = dict(state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config_json),
               tokenizer=ocp.args.JsonSave(tokenizer_json))
  if metrics is not None:  # the best-checkpoint manager records why it kept the step
    items['metrics'] = ocp.args.JsonSave({k: float(v) for k, v in metrics.items()})
  checkpoints.save(step, args=ocp.args.Composite(**items), force=True)


def best_loss(workdir: str) -> float:
  """The evaluation loss of the kept best checkpoint (inf if none)."""
  if not fs.isdir(os.path.join(fs.absolute(workdir), 'checkpoints_best')):
    return float('inf')
  best = best_manager(workdir, read_only=True)
  steps = best.all_steps()
  loss = read_json(best, steps[-1], 'metrics')['loss'] if steps else float('inf')
  best.close()
  return loss


def _step_path(checkpoints, step) -> str:
  return os.path.join(str(checkpoints.directory), str(step))


def read_json(checkpoints, step: int, item: str) -> dict:
  try:
    restored = checkpoints.restore(step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))
  except Exception as error:
    raise CheckpointError(f'checkpoint step {step} at {_step_path(checkpoints, step)} is '
                          f'damaged: cannot read {item!r} ({type(error).__name__}: {error})'
                          ) from error
  return restored[item]


def _shapes(tree) -> dict:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(path): tuple(leaf.shape) for path, leaf in flat}


def check_shapes(checkpoints, step: int, abstract_params, allow_unused: bool = False) -> None:
  """Raises CheckpointError listing every parameter whose shape differs
  (`allow_unused`: parameters only the checkpoint has are not a difference)."""
  try:
    metadata = checkpoints.item_metadata(step)['state']
    saved = _shapes(metadata['params'])
  except Exception as error:
    raise CheckpointError(f'checkpoint step {step} at {_step_path(checkpoints, step)} is '
                          f'damaged: cannot read its metadata ({type(error).__name__}: {error})'
                          ) from error
  wanted = _shapes(abstract_params)
  differences = []
  for name in sorted(set(saved) | set(wanted)):
    if allow_unused and name not in wanted:
      continue
    if saved.get(name) != wanted.get(name):
      differences.append(f'  params{name}: checkpoint {saved.get(name, "absent")}, '
                         f'model {wanted.get(name, "absent")}')
  if differences:
    shown = '\n'.join(differences[:12]) + ('\n  ...' if len(differences) > 12 else '')
    raise CheckpointError(
        f'checkpoint step {step} at {_step_path(checkpoints, step)} was made with a different '
        f'model shape ({len(differences)} parameter(s) differ):\n{shown}\n'
        'Use the config the run was trained with, or another workdir.')


def restore_state(checkpoints, step: int, abstract_state):
  """Restores the TrainState at `step` into the shardings of `abstract_state`."""
  check_shapes(checkpoints, step, abstract_state.params)
  try:
    restored = checkpoints.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))
  except Exception as error:
    raise CheckpointError(f'checkpoint step {step} at {_step_path(checkpoints, step)} could not '
                          f'be restored ({type(error).__name__}: {error})') from error
  return restored['state']


def check_tokenizer(checkpoints, step: int, tokenizer) -> None:
  """Raises CheckpointError if the checkpoint was made with another tokenizer."""
  saved = tokenizers.from_json(read_json(checkpoints, step, 'tokenizer')).fingerprint()
  current = tokenizer.fingerprint()
  if saved != current:
    raise CheckpointError(f'checkpoint step {step} at {_step_path(checkpoints, step)} was made '
                          f'with tokenizer {saved}, but this run uses {current}')



# ----------------------------------------------------------------------------
# Reading a run back anywhere: evaluation and sampling.

BEST = 'best'  # WORKDIR/checkpoints_best/<step>: the step with the lowest validation loss


def best_manager(workdir: str, read_only: bool = False) -> ocp.CheckpointManager:
  """Holds one checkpoint: the best evaluation so far (kept apart from the last N)."""
  options = ocp.CheckpointManagerOptions(max_to_keep=1, create=not read_only,
                                         read_only=read_only)
  handlers = {'state': ocp.StandardCheckpointHandler(), 'config': ocp.JsonCheckpointHandler(),
              'tokenizer': ocp.JsonCheckpointHandler(), 'metrics': ocp.JsonCheckpointHandler()}
  return ocp.CheckpointManager(os.path.join(fs.absolute(workdir), 'checkpoints_best'),
                               options=options, item_handlers=handlers)


def candidate_steps(workdir: str, step: str = 'latest'):
  """(manager, steps to try in order) for `step` = 'latest', 'best' or a number:
  'latest' lists every step, newest first, so a reader can fall back past damaged
  ones; a named step that does not exist raises CheckpointError listing those
  that do."""
  if step == BEST:
    checkpoints = best_manager(workdir, read_only=True)
    if not checkpoints.all_steps():
      raise CheckpointError(f'no best checkpoint in {checkpoints.directory} (evaluations during '
                            'training keep one when checkpoint.keep_best is on)')
    return checkpoints, sorted(checkpoints.all_steps())[-1:]
  checkpoints = manager(workdir, read_only=True)
  steps = sorted(checkpoints.all_steps())
  if not steps:
    raise CheckpointError(f'no checkpoint in {directory(workdir)}')
  if step == 'latest':
    return checkpoints, steps[::-1]
  try:
    chosen = int(step)
  except ValueError:
    raise CheckpointError(f"--step must be 'latest', 'best' or a step number; got {step!r}")
  if chosen not in steps:
    raise CheckpointError(f'no checkpoint for step {chosen} in {directory(workdir)}; steps '
                          f'present: {steps}')
  return checkpoints, [chosen]


def check_intact(checkpoints, step: int) -> None:
  """Raises CheckpointError naming the step and path if an item is missing. (Items
  that are present but unreadable fail, just as clearly, where they are read:
  `read_json`, `check_shapes`, `restore_params`.)"""
  path = _step_path(checkpoints, step)
  for item in ITEMS:
    if not fs.isdir(os.path.join(path, item)):
      raise CheckpointError(f'checkpoint step {step} at {path} is damaged: {item!r} is missing')


def read_run(checkpoints, step: int):
  """(config, tokenizer) that `step` was trained with."""
  from lmjax import config as config_lib
  config = config_lib.from_json(read_json(checkpoints, step, 'config'))
  return config, tokenizers.from_json(read_json(checkpoints, step, 'tokenizer'))


def newest_intact(workdir: str, step: str, read, log=print, what: str = ''):
  """(manager, step, read(manager, step)) for the first of `candidate_steps(workdir,
  step)` that is intact and that `read` reads without CheckpointError; each step
  skipped is a warning (prefixed with `what`), and the last one's error is raised."""
  checkpoints, candidates = candidate_steps(workdir, step)
  for i, chosen in enumerate(candidates):
    try:
      check_intact(checkpoints, chosen)
      result = read(checkpoints, chosen)
    except CheckpointError as error:
      if i + 1 == len(candidates):
        raise
      log(f'warning: {what}{error}; falling back to the previous step')
      continue
    if i:
      log(f'warning: {what}using step {chosen}, the newest intact checkpoint in '
          f'{checkpoints.directory}')
    return checkpoints, chosen, result
  raise AssertionError('unreachable')


def restore_params(checkpoints, step: int, abstract_params, allow_unused: bool = False):
  """Only the parameters of `step` (no optimizer state is read), straight into the
  shardings of `abstract_params`, whatever mesh or process count wrote them
  (`allow_unused`: the checkpoint may hold more parameters, which are not read)."""
  check_shapes(checkpoints, step, abstract_params, allow_unused)
  path = os.path.join(_step_path(checkpoints, step), 'state')
  target = {'params': abstract_params}
  try:
    with ocp.PyTreeCheckpointer() as checkpointer:
      restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
          item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
          partial_restore=True))
  except Exception as error:
    raise CheckpointError(f'checkpoint step {step} at {path}: parameters could not be '
                          f'restored ({type(error).__name__}: {error})') from error
  return restored['params']
