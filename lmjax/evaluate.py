"""Restoring a run anywhere, and the `lmjax.evaluate` command: metrics of a
checkpoint over any split, under the checkpoint's own tokenizer and cleaning.

    python -m lmjax.evaluate --workdir DIR [--step latest|best|N] [--split ...]
"""

import dataclasses
import json
import os
import sys
from typing import Any

import jax
import ml_collections
from absl import app
from absl import flags

from lmjax import checkpoint
from lmjax import config as config_lib
from lmjax import cpu_host
from lmjax import data as data_layer
from lmjax import derived as derived_lib
from lmjax import distributed
from lmjax import finetune
from lmjax import sharding
from lmjax import tasks
from lmjax import train_state

corpora = data_layer.lazy('lmjax.data.corpora')  # its errors; TensorFlow when read


@dataclasses.dataclass
class Restored:
  """A checkpoint read for inference: parameters on a data-parallel mesh over the
  devices present, and what the run was trained with."""

  config: Any
  derived: derived_lib.Derived
  tokenizer: Any
  model: Any
  params: Any
  step: int
  mesh: Any

  @property
  def task(self) -> tasks.Task:
    return tasks.get(self.config.task)


def restore_for_inference(workdir: str, step: str = 'latest', log=print) -> Restored:
  """Everything evaluation and sampling need from a checkpoint directory alone.
  Only the parameters are read, onto a data-parallel mesh over the devices
  present, whatever mesh wrote them. A LoRA run's adapters are merged into its
  base, read from its init_from."""
  mesh = sharding.make_mesh(ml_collections.ConfigDict({'data': -1, 'fsdp': 1, 'tensor': 1}))

  def read(checkpoints, chosen):
    config, record, tokenizer = checkpoint.read_run(checkpoints, chosen)
    model = tasks.get(config.task).build_model(config, record)
    params = _restore_model_params(config, model, checkpoints, chosen, mesh, log)
    return Restored(config, record, tokenizer, model, params, chosen, mesh)

  _, _, restored = checkpoint.newest_intact(workdir, step, read, log)
  return restored


def _restore_model_params(config, model, checkpoints, step: int, mesh, log):
  abstract = train_state.abstract_params(model, config.data.seq_len, mesh)
  plan = finetune.plan_for(config, model)
  if plan is None or plan.mode != 'lora':
    return checkpoint.restore_params(checkpoints, step, abstract)
  trainable = checkpoint.restore_params(
    checkpoints, step, train_state.abstract_params(model, config.data.seq_len, mesh, plan)
  )
  pretrained = finetune.open_pretrained(config.init_from, log)
  base = finetune.restore_backbone(pretrained, finetune.subtree(abstract, plan.prefix))
  return jax.jit(plan.assemble)(trainable, finetune.nest(plan.prefix, base))


def evaluate_checkpoint(
  workdir: str,
  step: str = 'latest',
  split: str | None = None,
  data_overrides: dict | None = None,
  max_batches: int = -1,
  batch_size: int = 0,
  log=print,
  eval_examples: int | None = None,
) -> dict:
  """Metrics of `split` (default: the run's evaluation split) under the
  checkpoint's own tokenizer and cleaning: loss, perplexity, bits/byte,
  accuracy, tokens and bytes of a language model (mlm: of the masked
  positions); accuracy, precision, recall, F1 and ROC AUC of a classifier,
  exact over the whole split; the target loss and perplexity of a seq2seq run,
  and ROUGE-1/2/L/Lsum of targets generated for the split's first
  `eval_examples` sources (None: the run's seq2seq.eval_examples; -1: all),
  with the lead-3 baseline's (lead3_rouge1, ...)."""
  restored = restore_for_inference(workdir, step, log)
  config, task = restored.config, restored.task
  if eval_examples is not None:
    config.seq2seq.eval_examples = eval_examples
  for key, value in (data_overrides or {}).items():
    config.data[key] = value  # the restored copy: the evaluation's own data settings
  split = split or config.data.eval_split
  batch_size = batch_size or config.train.eval_batch_size
  sharding.batch_size_check(batch_size, restored.mesh, '--batch_size')
  task_data = task.load_evaluation(config, restored.derived, restored.tokenizer, split)
  param_shardings = jax.tree.map(lambda leaf: leaf.sharding, restored.params)
  carry = train_state.carry_rows(config, restored.model) > 0
  evaluator = task.make_evaluator(
    config,
    restored.derived,
    task_data,
    restored.model,
    restored.tokenizer,
    param_shardings,
    restored.mesh,
    carry,
    batch_size,
  )
  result = evaluator(restored.params, max_batches)
  result.update(
    {
      'step': restored.step,
      'split': split,
      'corpus': config.data.name,
      'task': config.task,
      'tokenizer': restored.tokenizer.fingerprint(),
      'model': config.model.family,
    }
  )
  return result


def _data_overrides(argv) -> dict:
  """`--data.key=value` arguments, typed like the config's own data fields."""
  defaults = config_lib.base_config().data
  overrides = {}
  for arg in argv:
    if not arg.startswith('--data.'):
      continue
    key, _, text = arg[len('--data.') :].partition('=')
    config_lib.check_key_path(defaults, key)
    if '.' in key:
      raise config_lib.ConfigError(f'--data.{key}: only top-level data fields can be set here')
    kind = type(defaults[key])
    overrides[key] = (text.lower() in ('1', 'true', 'yes')) if kind is bool else kind(text)
  return overrides


def _main(argv):
  checkpoint.quiet_logs()
  cpu_host.prepare()
  flag_values = flags.FLAGS
  try:
    distributed.initialize_from_flags()
    log = lambda message: print(message, file=sys.stderr)
    result = evaluate_checkpoint(
      flag_values.workdir,
      flag_values.step,
      flag_values.split or None,
      _data_overrides(_DATA_ARGS),
      flag_values.eval_batches,
      flag_values.batch_size,
      log,
      None if flag_values.eval_examples < -1 else flag_values.eval_examples,
    )
  except (
    *checkpoint.ERRORS,
    config_lib.ConfigError,
    corpora.CorpusError,
    ValueError,
    distributed.DistributedError,
  ) as error:
    sys.exit(f'error: {error}')
  text = json.dumps(result, indent=2, sort_keys=True)
  if jax.process_index() == 0:
    print(text)
    if flag_values.output:
      with open(flag_values.output, 'w') as f:
        f.write(text + '\n')


_DATA_ARGS: list = []


def run():
  """Console entry point: `python -m lmjax.evaluate --workdir DIR [--step latest|best|N]
  [--split validation|test|...] [--data.KEY=VALUE ...] [--output FILE.json]`."""
  _DATA_ARGS[:] = [a for a in sys.argv[1:] if a.startswith('--data.')]
  argv = [a for a in sys.argv if not a.startswith('--data.')]
  flags.DEFINE_string('workdir', None, 'Training workdir holding checkpoints/.', required=True)
  flags.DEFINE_string('step', 'latest', "'latest' (newest intact), 'best', or a step number.")
  flags.DEFINE_string('split', '', "Split to evaluate (tfds syntax; '' = the run's eval split).")
  flags.DEFINE_integer('eval_batches', -1, 'Batches to evaluate (-1 = the whole split).')
  flags.DEFINE_integer('batch_size', 0, "Global batch size (0 = the run's eval batch size).")
  flags.DEFINE_integer(
    'eval_examples',
    -2,
    'task=seq2seq: sources to generate targets for, for ROUGE (-1 = the whole split, '
    "-2 = the run's seq2seq.eval_examples).",
  )
  flags.DEFINE_string('output', '', 'Also write the JSON result to this file.')
  distributed.define_flags()
  app.run(_main, argv=argv)


if __name__ == '__main__':
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  run()
