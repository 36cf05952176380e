"""What a run learns (`config.task`): its data, batches, evaluation and baseline.

  lm        next-token prediction with a causal model (Transformer or recurrent)
            over a token stream; the baseline is the unigram entropy.
  mlm       masked-token prediction with the bidirectional encoder: the same
            stream and layouts, BERT masking in tf.data (pipeline.Masking);
            loss and accuracy on the chosen positions only.
  classify  one label per text (lmjax.data.labelled), any family with a
            classifier head; exact accuracy / precision / recall / F1 / ROC AUC
            over the whole split; the baseline is the majority class.

The train loop sees only `TaskData.train_batches(start_step)` and an
evaluator `(params, max_batches) -> metrics`, the same for every task.
"""

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lmjax import classification_metrics
from lmjax import evaluation
from lmjax import models
from lmjax import sharding
from lmjax import steps
from lmjax import watchdog
from lmjax.data import labelled
from lmjax.data import pipeline

TASKS = ('lm', 'mlm', 'classify')


def check(config) -> None:
  """The task, family and layout fit together (before any data is read)."""
  family = config.model.family
  if config.task not in TASKS:
    raise ValueError(f'task must be one of {", ".join(TASKS)}; got {config.task!r}')
  if config.task == 'lm' and family == 'encoder':
    raise ValueError(
      "model.family='encoder' is bidirectional: it cannot predict the next "
      "token; use task='mlm' (or 'classify')"
    )
  if config.task == 'mlm':
    models.mask_token_id(config.model, 0)  # raises unless the family is 'encoder'
    if config.data.layout == 'stream':
      raise ValueError("task='mlm' reads 'windows' or 'packed' rows, not 'stream'")


@dataclasses.dataclass
class TaskData:
  """A task's training and evaluation data and the numbers the log reports."""

  task: str
  train: Any  # pipeline.TokenStream, or labelled.LabelledSplit
  eval: Any
  baseline: float
  baseline_name: str  # 'unigram entropy' (nats/token) or 'majority-class accuracy'
  description: str
  masking: pipeline.Masking | None = None
  num_classes: int = 0

  @property
  def baseline_key(self) -> str:
    return 'majority_baseline' if self.task == 'classify' else 'unigram_entropy'

  def steps_per_epoch(self, config) -> int:
    if self.task == 'classify':
      per_epoch = len(self.train) // config.train.batch_size
      if not per_epoch:
        raise labelled.corpora.CorpusError(
          f'the training split has {len(self.train)} examples; one batch needs '
          f'{config.train.batch_size}'
        )
      return per_epoch
    return pipeline.require_steps_per_epoch(
      self.train, config.data.seq_len, config.train.batch_size, config.data.layout
    )

  def train_batches(self, config, start_step: int):
    """This process' rows of the batches of steps start_step, start_step + 1, ..."""
    if self.task == 'classify':
      return pipeline.row_batches(
        self.train.rows,
        config.train.batch_size,
        config.seed,
        start_step,
        jax.process_index(),
        jax.process_count(),
      )
    return pipeline.train_batches(
      self.train,
      config.data.seq_len,
      config.train.batch_size,
      config.seed,
      start_step,
      jax.process_index(),
      jax.process_count(),
      config.data.layout,
      self.masking,
    )


def masking_for(config, tokenizer) -> pipeline.Masking | None:
  if config.task != 'mlm':
    return None
  return pipeline.Masking.from_config(
    config.mlm, models.mask_token_id(config.model, tokenizer.vocab_size), tokenizer.vocab_size
  )


def load(config, tokenizer, splits=None) -> TaskData:
  """Reads and tokenizes the training and evaluation splits (`splits` overrides
  them: (train, eval)). Classification fills in classify.num_classes and
  label_names from the training labels."""
  data = config.data
  train_split, eval_split = splits or (data.train_split, data.eval_split)
  if config.task == 'classify':
    loaded = labelled.load(
      data, config.classify, tokenizer, data.seq_len, [train_split, eval_split]
    )
    train, evaluation = loaded[train_split], loaded[eval_split]
    num_classes = config.classify.num_classes
    baseline = classification_metrics.majority_baseline(train.rows['targets'], num_classes)
    counts = np.bincount(train.rows['targets'], minlength=num_classes).tolist()
    return TaskData(
      'classify',
      train,
      evaluation,
      baseline,
      'majority-class accuracy',
      f'{len(train):,} labelled training texts (class counts {counts}), '
      f'{len(evaluation):,} for evaluation; {num_classes} classes',
      num_classes=num_classes,
    )
  train = pipeline.tokenize_split(data, tokenizer, train_split)
  evaluation = pipeline.tokenize_split(data, tokenizer, eval_split)
  baseline = pipeline.unigram_entropy(train.tokens, tokenizer.vocab_size)
  return TaskData(
    config.task,
    train,
    evaluation,
    baseline,
    'unigram entropy',
    f'train {len(train.tokens):,} tokens in {train.num_documents:,} documents, '
    f'eval {len(evaluation.tokens):,} tokens',
    masking_for(config, tokenizer),
  )


def load_evaluation(config, tokenizer, split: str) -> TaskData:
  """Only the split to evaluate (the run's saved config already holds the
  classes and label names its training split gave)."""
  if config.task == 'classify':
    evaluation = labelled.load(
      config.data, config.classify, tokenizer, config.data.seq_len, [split]
    )[split]
  else:
    evaluation = pipeline.tokenize_split(config.data, tokenizer, split)
  return TaskData(
    config.task,
    None,
    evaluation,
    float('nan'),
    '',
    '',
    masking_for(config, tokenizer),
    config.classify.num_classes,
  )


def build_model(config, tokenizer_or_vocab_size):
  """The run's model: a language model, or a classifier over one."""
  vocab_size = getattr(tokenizer_or_vocab_size, 'vocab_size', tokenizer_or_vocab_size)
  num_classes = config.classify.num_classes if config.task == 'classify' else 0
  return models.build_model(
    config.model, vocab_size, config.data.seq_len, num_classes, config.classify.pooling
  )


def batch_shapes(config, batch_size: int) -> dict:
  """{name: (shape, dtype)} of a training batch (for compiling without data)."""
  rows = (batch_size, config.data.seq_len)
  shapes = {'inputs': (rows, np.int32), 'targets': (rows, np.int32), 'weights': (rows, np.float32)}
  if config.task == 'classify':
    shapes.update(
      targets=((batch_size,), np.int32),
      weights=((batch_size,), np.float32),
      segment_ids=(rows, np.int32),
      positions=(rows, np.int32),
    )
  elif config.data.layout == 'packed':
    shapes.update(segment_ids=(rows, np.int32), positions=(rows, np.int32))
  elif config.data.layout == 'stream':
    shapes['reset'] = ((batch_size,), np.float32)
  return shapes


# ----------------------------------------------------------------------------
# Evaluation.


def _classify_outputs(params, batch, *, model):
  logits, _ = steps.apply_model(model, params, batch, deterministic=True)
  losses, _ = steps.token_losses(logits, batch['targets'])
  return {
    'probabilities': jax.nn.softmax(logits.astype(jnp.float32), axis=-1),
    'losses': losses,
    'targets': batch['targets'],
    'weights': batch['weights'],
  }


def evaluate_classifier(
  outputs_fn, params, split: labelled.LabelledSplit, batch_size: int, mesh, max_batches: int = -1
) -> dict:
  """Exact metrics over the split (or its first batches): every example's class
  probabilities are gathered to the host, so nothing is averaged per batch."""
  gathered = []
  batches = pipeline.eval_row_batches(
    split.rows, batch_size, max_batches, jax.process_index(), jax.process_count()
  )
  with sharding.rules_and_mesh(mesh):
    for local in batches:
      gathered.append(jax.device_get(outputs_fn(params, sharding.make_global_batch(local, mesh))))
      watchdog.beat()
  outputs = {k: np.concatenate([g[k] for g in gathered]) for k in gathered[0]}
  keep = outputs['weights'] > 0
  result = classification_metrics.classification_metrics(
    outputs['targets'][keep], outputs['probabilities'][keep], split.num_classes
  )
  result['loss'] = float(np.mean(outputs['losses'][keep]))
  return result


def make_evaluator(
  config, task_data: TaskData, model, tokenizer, param_shardings, mesh, carry: bool = False
) -> Callable:
  """(params, max_batches) -> metrics of the evaluation split, for any task."""
  batch_size = config.train.eval_batch_size
  if task_data.task == 'classify':
    outputs_fn = jax.jit(
      functools.partial(_classify_outputs, model=model),
      in_shardings=(param_shardings, sharding.batch_sharding(mesh)),
      out_shardings=sharding.replicated(mesh),
    )
    return lambda params, max_batches: evaluate_classifier(
      outputs_fn, params, task_data.eval, batch_size, mesh, max_batches
    )
  eval_fn = evaluation.make_eval_fn(model, tokenizer, param_shardings, mesh)
  return lambda params, max_batches: evaluation.evaluate(
    eval_fn,
    params,
    task_data.eval,
    config.data.seq_len,
    batch_size,
    mesh,
    max_batches,
    config.data.layout,
    model,
    carry,
    task_data.masking,
    config.seed,
  )


def describe(result: dict) -> str:
  """One log line's worth of an evaluation, whatever the task."""
  if 'f1_macro' in result:
    auc = result.get('roc_auc', result.get('roc_auc_macro_ovr', float('nan')))
    return (
      f'loss {result["loss"]:.4f} | accuracy {result["accuracy"]:.4f} | F1 (macro) '
      f'{result["f1_macro"]:.4f} | ROC AUC {auc:.4f} | {int(result["examples"]):,} examples'
    )
  return (
    f'loss {result["loss"]:.4f} | perplexity {result["perplexity"]:.2f} | bits/byte '
    f'{result["bits_per_byte"]:.3f} | accuracy {result["accuracy"]:.3f} | '
    f'{int(result["tokens"]):,} tokens'
  )
