"""Merge a LoRA fine-tuning run into plain weights.

    python -m lmjax.merge --workdir LORA_RUN --output MERGED [--step latest|best|N]

Writes MERGED/checkpoints/<step>/ with the merged parameters (W + alpha/r A B,
the new head included), the run's tokenizer and its config with init_from
cleared and finetune.mode='full': `lmjax.evaluate`, `lmjax.sample` and a
further `init_from` read it like any run, without the pre-training workdir.
It holds no optimizer state: it is an end point (or a new start), not a run
to resume.
"""

import json
import sys

import jax
from absl import app
from absl import flags

from lmjax import checkpoint
from lmjax import config as config_lib
from lmjax import evaluate


def merge(workdir: str, output: str, step: str = 'latest', log=print) -> int:
  """Writes the merged checkpoint of `workdir`'s `step` under `output`; returns the step."""
  restored = evaluate.restore_for_inference(workdir, step, log)
  config, chosen = restored.config, restored.step
  if not (config.init_from and config.finetune.mode == 'lora'):
    raise checkpoint.CheckpointError(
      f'{workdir} is not a LoRA run (init_from={config.init_from!r}, '
      f'finetune.mode={config.finetune.mode!r}): nothing to merge'
    )
  config.init_from = ''  # the restored copy becomes the merged run's config
  config.finetune.mode = 'full'
  checkpoints = checkpoint.manager(output)
  if chosen in checkpoints.all_steps():
    raise checkpoint.CheckpointError(
      f'{checkpoint.directory(output)} already has step {chosen}; choose another --output'
    )
  checkpoint.save(
    checkpoints,
    chosen,
    {'step': jax.numpy.asarray(chosen), 'params': restored.params},
    json.loads(config_lib.to_json(config)),
    restored.derived,
    restored.tokenizer.to_json(),
  )
  checkpoints.wait_until_finished()
  checkpoints.close()
  return chosen


def _main(argv):
  del argv
  checkpoint.quiet_logs()
  values = flags.FLAGS
  try:
    chosen = merge(
      values.workdir,
      values.output,
      values.step,
      log=lambda message: print(message, file=sys.stderr),
    )
  except (*checkpoint.ERRORS, config_lib.ConfigError, ValueError) as error:
    sys.exit(f'error: {error}')
  print(f'merged step {chosen} of {values.workdir} into {checkpoint.directory(values.output)}')


def run():
  flags.DEFINE_string('workdir', None, 'The LoRA run.', required=True)
  flags.DEFINE_string('output', None, 'Directory to write the merged checkpoint to.', required=True)
  flags.DEFINE_string('step', 'latest', "'latest', 'best' or a step number.")
  app.run(_main)


if __name__ == '__main__':
  run()
