"""Orbax checkpoints: one self-contained directory per step.

Layout (`WORKDIR/checkpoints/<step>/`), as Orbax items:
  state/      the TrainState pytree {step, params, opt_state} (StandardSave)
  config/     the config, as validated (JSON)
  derived/    what the run derived from its data: vocabulary, length, classes
              (JSON; lmjax.derived)
  tokenizer/  the tokenizer, model included (JSON; see lmjax.data.tokenizers)

Resume order: the tokenizer is checked first (it fixes the vocabulary), then
the parameter shapes against the configured model, then the state is restored
straight into its sharded layout.
"""

import contextlib
import os
import re
import shutil
import sys
import time

import jax
import orbax.checkpoint as ocp

from lmjax import config as config_lib
from lmjax import derived as derived_lib
from lmjax import fs
from lmjax import storage
from lmjax.data import tokenizers

ITEMS = ('state', 'config', 'derived', 'tokenizer')


def quiet_logs() -> None:
  """Orbax logs every save and restore at INFO: command-line tools show warnings
  and errors only, unless --verbosity asks for more. A failed read also leaves
  Orbax's sibling reads (asyncio coroutines) to report the same error again as
  "exception never retrieved" / "Exception ignored", a traceback each, after the
  error itself was raised (and reported by lmjax in one line): those are dropped."""
  import logging as std_logging

  from absl import flags
  from absl import logging

  if 'verbosity' not in flags.FLAGS or not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
    std_logging.getLogger('asyncio').setLevel(std_logging.CRITICAL)
  # An asynchronous save that fails logs its traceback from Orbax's thread, then
  # raises the same error in the main thread, which lmjax reports in one line.
  std_logging.getLogger('absl').addFilter(
    lambda record: '_SignalingThread.run() raised an exception' not in str(record.msg)
  )
  default_hook = sys.unraisablehook

  def hook(unraisable):
    code = getattr(unraisable.object, 'cr_code', None)
    if code is not None and 'orbax' in code.co_filename:
      return
    default_hook(unraisable)

  sys.unraisablehook = hook


class CheckpointError(RuntimeError):
  """A checkpoint that is missing, corrupt or does not fit the run."""


class CheckpointDamaged(CheckpointError):
  """A step whose files are missing or corrupt: readers may fall back to an older one."""


class CheckpointIOError(RuntimeError):
  """Storage failed (permissions, network, disk full), not the checkpoint: readers do
  not fall back to an older step, since the newest may be fine."""


ERRORS = (CheckpointError, CheckpointIOError)  # what entry points report as `error: ...`
IO_ATTEMPTS = 3  # reads of a step that fail with an I/O error are tried this often
RETRY_DELAY_S = 1.0  # before the second attempt; doubled before each later one


def _intact_note(checkpoints, failed_step=None) -> str:
  """What a failed save leaves: the steps written before it."""
  kept = [s for s in checkpoints.all_steps() if s != failed_step]
  newest = f'step {max(kept)}' if kept else 'none'
  return f'The checkpoints already written are intact (newest: {newest}).'


def describe_failure(error: BaseException, workdir: str = '') -> str:
  """The message of an error an entry point reports; a full disk, wherever it
  surfaced (a checkpoint, metrics.jsonl, TensorBoard), says so in one line."""
  if storage.is_disk_full(error) and not isinstance(error, CheckpointIOError):
    return (
      f'disk full: cannot write to {workdir or "the workdir"} ({storage.brief(error)}). '
      'Free space there or use another --workdir; the checkpoints already written are '
      'intact'
    )
  return str(error)


@contextlib.contextmanager
def save_errors(checkpoints, step):
  """Turns a failed save (a full disk, unwritable storage) into CheckpointIOError
  naming the step and path; Orbax's asynchronous save surfaces its error in the
  next call, so `step` may be the one before."""
  try:
    yield
  except Exception as error:  # noqa: BLE001 - Orbax and TensorStore raise many kinds
    if not storage.is_io_failure(error):
      raise
    failed = re.search(
      r'/(\d+)\.orbax-checkpoint-tmp',  # the save in flight
      ' '.join(str(link) for link in storage.chain(error)),
    )
    step = int(failed.group(1)) if failed else step
    path = _step_path(checkpoints, step)
    cause = 'disk full' if storage.is_disk_full(error) else 'storage error'
    raise CheckpointIOError(
      f'{cause}: could not write checkpoint step {step} to {path} '
      f'({storage.brief(error)}). {_intact_note(checkpoints, step)} Free space or fix '
      'access there, or use another --workdir; then run again to resume'
    ) from error


def _attempt(read, step: int, path: str, what: str):
  """`read()`, retried on I/O failures; any other failure means the step is damaged."""
  for attempt in range(IO_ATTEMPTS):
    try:
      return read()
    except CheckpointError:
      raise
    except Exception as error:  # noqa: BLE001 - Orbax, TensorStore and the OS raise many kinds
      if not storage.is_io_failure(error):
        raise CheckpointDamaged(
          f'checkpoint step {step} at {path} is damaged: cannot read '
          f'{what} ({storage.brief(error)})'
        ) from error
      if attempt + 1 == IO_ATTEMPTS:
        raise CheckpointIOError(
          f'checkpoint step {step} at {path}: reading {what} failed {IO_ATTEMPTS} times with '
          f'a storage error ({storage.brief(error)}). That is not damage, so no older step '
          'was used: fix access to the storage (permissions, network, space) and run again'
        ) from error
      time.sleep(RETRY_DELAY_S * 2**attempt)
  raise AssertionError('unreachable')


def directory(workdir: str) -> str:
  return os.path.join(fs.absolute(workdir), 'checkpoints')


def _state_handler() -> ocp.PyTreeCheckpointHandler:
  """The state's handler: Orbax's own format, without the `_sharding` file. That
  file records the devices of the mesh that wrote the step, and plain Orbax's
  restore without a target (`StandardCheckpointer().restore(path)`) fails on any
  other device count ("Topology mismatch"); without it, that restore returns
  numpy arrays anywhere. lmjax always restores into explicit shardings."""
  registry = ocp.type_handlers.create_type_handler_registry(
    (jax.Array, ocp.type_handlers.ArrayHandler(enable_write_sharding_file=False))
  )
  return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


def _handlers(*extra: str) -> dict:
  return {
    'state': _state_handler(),
    'config': ocp.JsonCheckpointHandler(),
    'derived': ocp.JsonCheckpointHandler(),
    'tokenizer': ocp.JsonCheckpointHandler(),
    **{item: ocp.JsonCheckpointHandler() for item in extra},
  }


def manager(workdir: str, checkpoint_config=None, read_only: bool = False) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
    max_to_keep=checkpoint_config.keep if checkpoint_config else None,
    enable_async_checkpointing=bool(checkpoint_config and checkpoint_config.async_save),
    create=not read_only,
    read_only=read_only,
  )
  return ocp.CheckpointManager(directory(workdir), options=options, item_handlers=_handlers())


SPACE_MARGIN = 1 << 20  # bytes a step needs beyond its arrays (metadata, JSON items)


def check_space(checkpoints, step: int, state) -> None:
  """Raises CheckpointIOError before a save that cannot fit on a local disk.

  Orbax writes a step from a background thread and TensorStore's callbacks;
  when the disk fills up mid-write, several of them print their own tracebacks
  before the error reaches lmjax. Checking first (the step needs at most its
  arrays' bytes: Orbax compresses them) keeps that case to one clear line; the
  error handling of `save_errors` still covers a disk filled by someone else
  during the write. Object stores have no free-space figure: not checked."""
  path = str(checkpoints.directory)
  if '://' in path:
    return
  checkpoints.wait_until_finished()  # the previous step's bytes are on disk now
  needed = SPACE_MARGIN + sum(
    int(leaf.nbytes) for leaf in jax.tree.leaves(state) if hasattr(leaf, 'nbytes')
  )
  free = shutil.disk_usage(path).free
  if free < needed:
    raise CheckpointIOError(
      f'disk full: checkpoint step {step} needs up to {needed / 2**20:.1f} MiB in {path}, '
      f'but {free / 2**20:.1f} MiB are free there. {_intact_note(checkpoints)} Free space '
      'or use another --workdir, then run again to resume'
    )


def save(
  checkpoints: ocp.CheckpointManager,
  step: int,
  state,
  config_json: dict,
  derived: derived_lib.Derived,
  tokenizer_json: dict,
  metrics: dict | None = None,
) -> None:
  check_space(checkpoints, step, state)
  items = dict(
    state=ocp.args.PyTreeSave(state),
    config=ocp.args.JsonSave(config_json),
    derived=ocp.args.JsonSave(derived.to_json()),
    tokenizer=ocp.args.JsonSave(tokenizer_json),
  )
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
  restored = _attempt(
    lambda: checkpoints.restore(step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()})),
    step,
    _step_path(checkpoints, step),
    repr(item),
  )
  return restored[item]


def _shapes(tree) -> dict:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(path): tuple(leaf.shape) for path, leaf in flat}


def check_shapes(checkpoints, step: int, abstract_params, allow_unused: bool = False) -> None:
  """Raises CheckpointError listing every parameter whose shape differs
  (`allow_unused`: parameters only the checkpoint has are not a difference)."""
  saved = _attempt(
    lambda: _shapes(checkpoints.item_metadata(step)['state']['params']),
    step,
    _step_path(checkpoints, step),
    'its metadata',
  )
  wanted = _shapes(abstract_params)
  differences = []
  for name in sorted(set(saved) | set(wanted)):
    if allow_unused and name not in wanted:
      continue
    if saved.get(name) != wanted.get(name):
      differences.append(
        f'  params{name}: checkpoint {saved.get(name, "absent")}, '
        f'model {wanted.get(name, "absent")}'
      )
  if differences:
    shown = '\n'.join(differences[:12]) + ('\n  ...' if len(differences) > 12 else '')
    raise CheckpointError(
      f'checkpoint step {step} at {_step_path(checkpoints, step)} was made with a different '
      f'model shape ({len(differences)} parameter(s) differ):\n{shown}\n'
      'Use the config the run was trained with, or another workdir.'
    )


def restore_state(checkpoints, step: int, abstract_state):
  """Restores the TrainState at `step` into the shardings of `abstract_state`."""
  check_shapes(checkpoints, step, abstract_state.params)
  restored = _attempt(
    lambda: checkpoints.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
          item=abstract_state,
          restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state),
        )
      ),
    ),
    step,
    _step_path(checkpoints, step),
    "'state'",
  )
  return restored['state']


def check_tokenizer(checkpoints, step: int, tokenizer) -> None:
  """Raises CheckpointError if the checkpoint was made with another tokenizer."""
  saved = tokenizers.from_json(read_json(checkpoints, step, 'tokenizer')).fingerprint()
  current = tokenizer.fingerprint()
  if saved != current:
    raise CheckpointError(
      f'checkpoint step {step} at {_step_path(checkpoints, step)} was made '
      f'with tokenizer {saved}, but this run uses {current}'
    )


# ----------------------------------------------------------------------------
# Reading a run back anywhere: evaluation and sampling.

BEST = 'best'  # WORKDIR/checkpoints_best/<step>: the step with the lowest validation loss


def best_manager(workdir: str, read_only: bool = False) -> ocp.CheckpointManager:
  """Holds one checkpoint: the best evaluation so far (kept apart from the last N)."""
  options = ocp.CheckpointManagerOptions(max_to_keep=1, create=not read_only, read_only=read_only)
  return ocp.CheckpointManager(
    os.path.join(fs.absolute(workdir), 'checkpoints_best'),
    options=options,
    item_handlers=_handlers('metrics'),
  )


def candidate_steps(workdir: str, step: str = 'latest'):
  """(manager, steps to try in order) for `step` = 'latest', 'best' or a number:
  'latest' lists every step, newest first, so a reader can fall back past damaged
  ones; a named step that does not exist raises CheckpointError listing those
  that do."""
  if step == BEST:
    checkpoints = best_manager(workdir, read_only=True)
    if not checkpoints.all_steps():
      raise CheckpointError(
        f'no best checkpoint in {checkpoints.directory} (evaluations during '
        'training keep one when checkpoint.keep_best is on)'
      )
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
    raise CheckpointError(
      f"--step must be 'latest', 'best' or a step number; got {step!r}"
    ) from None
  if chosen not in steps:
    raise CheckpointError(
      f'no checkpoint for step {chosen} in {directory(workdir)}; steps present: {steps}'
    )
  return checkpoints, [chosen]


def check_intact(checkpoints, step: int) -> None:
  """Raises CheckpointError naming the step and path if an item is missing. (Items
  that are present but unreadable fail, just as clearly, where they are read:
  `read_json`, `check_shapes`, `restore_params`.)"""
  path = _step_path(checkpoints, step)
  for item in ITEMS:
    present = _attempt(lambda item=item: fs.isdir(os.path.join(path, item)), step, path, repr(item))
    if not present:
      raise CheckpointDamaged(f'checkpoint step {step} at {path} is damaged: {item!r} is missing')


def read_run(checkpoints, step: int):
  """(config, derived record, tokenizer) that `step` was trained with."""
  config = config_lib.from_json(read_json(checkpoints, step, 'config'))
  derived = derived_lib.Derived.from_json(read_json(checkpoints, step, 'derived'))
  return config, derived, tokenizers.from_json(read_json(checkpoints, step, 'tokenizer'))


def newest_intact(workdir: str, step: str, read, log=print, what: str = ''):
  """(manager, step, read(manager, step)) for the first of `candidate_steps(workdir,
  step)` that is intact and that `read` reads without CheckpointError; each step
  skipped is a warning (prefixed with `what`), and the last one's error is raised."""
  checkpoints, candidates = candidate_steps(workdir, step)
  for i, chosen in enumerate(candidates):
    try:
      check_intact(checkpoints, chosen)
      result = read(checkpoints, chosen)
    except CheckpointDamaged as error:
      if i + 1 == len(candidates):
        raise
      log(f'warning: {what}{error}; falling back to the previous step')
      continue
    if i:
      log(
        f'warning: {what}using step {chosen}, the newest intact checkpoint in '
        f'{checkpoints.directory}'
      )
    return checkpoints, chosen, result
  raise AssertionError('unreachable')


DAMAGED = 'checkpoints_damaged'  # WORKDIR/checkpoints_damaged/<step>: set aside, never deleted


def resume_point(workdir: str, read, log=print):
  """(step, read(manager, step)) of the newest intact checkpoint, for resuming
  training. Newer damaged steps are moved (by process 0) to WORKDIR/{DAMAGED}/,
  kept for inspection and out of the way of the steps the run will save again;
  each is one warning. If no step is intact, nothing is moved and the newest
  step's error is raised."""
  checkpoints, step, result = newest_intact(workdir, 'latest', read, log=log)
  newer = [s for s in checkpoints.all_steps() if s > step]
  aside = os.path.join(fs.absolute(workdir), DAMAGED)
  for skipped in sorted(newer):
    source, target = _step_path(checkpoints, skipped), os.path.join(aside, str(skipped))
    if jax.process_index() == 0:
      fs.makedirs(aside)
      if fs.exists(target):
        target = f'{target}.{int(time.time())}'
      fs.move_tree(source, target)
    log(f'warning: moved damaged checkpoint step {skipped} to {target} (kept, not deleted)')
  if newer and jax.process_count() > 1:
    from jax.experimental import multihost_utils  # only multi-process runs need the barrier

    multihost_utils.sync_global_devices('lmjax: damaged checkpoints moved aside')
  return step, result


def restore_params(checkpoints, step: int, abstract_params, allow_unused: bool = False):
  """Only the parameters of `step` (no optimizer state is read), straight into the
  shardings of `abstract_params`, whatever mesh or process count wrote them
  (`allow_unused`: the checkpoint may hold more parameters, which are not read)."""
  check_shapes(checkpoints, step, abstract_params, allow_unused)
  path = os.path.join(_step_path(checkpoints, step), 'state')
  target = {'params': abstract_params}

  def read():
    with ocp.PyTreeCheckpointer() as checkpointer:
      return checkpointer.restore(
        path,
        args=ocp.args.PyTreeRestore(
          item=target,
          restore_args=ocp.checkpoint_utils.construct_restore_args(target),
          partial_restore=True,
        ),
      )

  return _attempt(read, step, _step_path(checkpoints, step), 'its parameters')['params']
