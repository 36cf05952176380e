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

from lmjax.data import tokenizers

ITEMS = ('state', 'config', 'tokenizer')


class CheckpointError(RuntimeError):
  """A checkpoint that is missing, corrupt or does not fit the run."""


def directory(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


def manager(workdir: str, checkpoint_config=None, read_only: bool = False) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=checkpoint_config.keep if checkpoint_config else None,
      enable_async_checkpointing=bool(checkpoint_config and checkpoint_config.async_save),
      create=not read_only, read_only=read_only)
  handlers = {'state': ocp.StandardCheckpointHandler(), 'config': ocp.JsonCheckpointHandler(),
              'tokenizer': ocp.JsonCheckpointHandler()}
  return ocp.CheckpointManager(directory(workdir), options=options, item_handlers=handlers)


def save(checkpoints: ocp.CheckpointManager, step: int, state, config_json: dict,
         tokenizer_json: dict) -> None:
  checkpoints.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      config=ocp.args.JsonSave(config_json),
      tokenizer=ocp.args.JsonSave(tokenizer_json)), force=True)


def _step_path(checkpoints, step) -> str:
  return os.path.join(str(checkpoints.directory), str(step))


def read_json(checkpoints, step: int, item: str) -> dict:
  try:
    restored = checkpoints.restore(step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))
  except Exception as error:
    raise CheckpointError(f'checkpoint step {step} at {_step_path(checkpoints, step)}: '
                          f'cannot read {item!r} ({type(error).__name__}: {error})') from error
  return restored[item]


def _shapes(tree) -> dict:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(path): tuple(leaf.shape) for path, leaf in flat}


def check_shapes(checkpoints, step: int, abstract_params) -> None:
  """Raises CheckpointError listing every parameter whose shape differs."""
  try:
    metadata = checkpoints.item_metadata(step)['state']
    saved = _shapes(metadata['params'])
  except Exception as error:
    raise CheckpointError(f'checkpoint step {step} at {_step_path(checkpoints, step)}: '
                          f'cannot read its metadata ({type(error).__name__}: {error})') from error
  wanted = _shapes(abstract_params)
  differences = []
  for name in sorted(set(saved) | set(wanted)):
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

