"""task='classify': one label per text (lmjax.data.labelled), any family with a
classifier head; exact accuracy / precision / recall / F1 / ROC AUC over the
whole split (every example's probabilities are gathered to the host, nothing is
averaged per batch); the baseline is the majority class."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from lmjax import classification_metrics
from lmjax import data as data_layer
from lmjax import derived as derived_lib
from lmjax import models
from lmjax import sharding
from lmjax import steps
from lmjax import watchdog
from lmjax.tasks import base

# The data layer (TensorFlow) loads when a task first reads data.
corpora = data_layer.lazy('lmjax.data.corpora')
labelled = data_layer.lazy('lmjax.data.labelled')
pipeline = data_layer.lazy('lmjax.data.pipeline')


def _outputs(params, batch, *, model):
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
  """Exact metrics over the split (or its first batches)."""
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


@dataclasses.dataclass
class LabelledData(base.TaskData):
  """Labelled splits, with the classes the training split resolved."""

  classes: labelled.Classes | None = None


class Classify(base.RowsTask):
  name = 'classify'
  baseline_name = 'majority-class accuracy'
  baseline_key = 'majority_baseline'

  def check(self, config) -> None:
    base.require_no_encoder_decoder(config, self.name)

  def load(self, config, tokenizer, splits=None) -> LabelledData:
    data = config.data
    train_split, eval_split = splits or (data.train_split, data.eval_split)
    splits = [train_split, eval_split]
    loaded, classes = labelled.load(
      data, config.classify, tokenizer, data.seq_len, splits, None, base.log, base.share()
    )
    train, evaluated = loaded[train_split], loaded[eval_split]
    counts = np.bincount(train.rows['targets'], minlength=classes.num_classes).tolist()
    return LabelledData(
      train,
      evaluated,
      classification_metrics.majority_baseline(train.rows['targets'], classes.num_classes),
      f'{len(train):,} labelled training texts (class counts {counts}), '
      f'{len(evaluated):,} for evaluation; {classes.num_classes} classes',
      classes,
    )

  def train_texts(self, config):
    examples = labelled.examples(config.data, config.classify, config.data.train_split)
    return (text for text, _ in examples)

  def prepare(self, config, tokenizer, split, share=(0, 1), log=print) -> dict:
    path, manifest, prepared = labelled.ensure_split(
      config.data, config.classify, tokenizer, split, log, share
    )
    return {
      'split': split,
      'path': path,
      'tokens': manifest['tokens'],
      'documents': manifest['documents'],
      'prepared': prepared,
    }

  def load_evaluation(self, config, derived, tokenizer, split) -> LabelledData:
    classes = labelled.Classes(derived.num_classes, derived.label_names)
    loaded, _ = labelled.load(
      config.data,
      config.classify,
      tokenizer,
      config.data.seq_len,
      [split],
      classes,
      base.log,
      base.share(),
    )
    return LabelledData(None, loaded[split], float('nan'), '', classes)

  def derive(self, config, tokenizer, data) -> derived_lib.Derived:
    record = super().derive(config, tokenizer, data)
    return derived_lib.Derived(
      **{
        **record.to_json(),
        'num_classes': data.classes.num_classes,
        'label_names': data.classes.names,
      }
    )

  def from_shapes(self, config, vocab_size: int) -> derived_lib.Derived:
    if config.classify.num_classes < 2:
      raise ValueError(
        'a classifier compiled or benchmarked without data needs '
        '--config.classify.num_classes (at least 2)'
      )
    record = super().from_shapes(config, vocab_size)
    return derived_lib.Derived(**{**record.to_json(), 'num_classes': config.classify.num_classes})

  def batch_shapes(self, config, batch_size: int) -> dict:
    rows = (batch_size, config.data.seq_len)
    return {
      'inputs': (rows, np.int32),
      'targets': ((batch_size,), np.int32),
      'weights': ((batch_size,), np.float32),
      'segment_ids': (rows, np.int32),
      'positions': (rows, np.int32),
    }

  def build_model(self, config, derived):
    return models.build_model(
      config.model,
      derived.vocab_size,
      config.data.seq_len,
      derived.num_classes,
      config.classify.pooling,
    )

  def make_evaluator(
    self,
    config,
    derived,
    data,
    model,
    tokenizer,
    param_shardings,
    mesh,
    carry=False,
    batch_size=0,
  ):
    outputs_fn = jax.jit(
      functools.partial(_outputs, model=model),
      in_shardings=(param_shardings, sharding.batch_sharding(mesh)),
      out_shardings=sharding.replicated(mesh),
    )
    batch_size = batch_size or config.train.eval_batch_size
    return lambda params, max_batches: evaluate_classifier(
      outputs_fn, params, data.eval, batch_size, mesh, max_batches
    )

  def describe(self, result: dict) -> str:
    auc = result.get('roc_auc', result.get('roc_auc_macro_ovr', float('nan')))
    return (
      f'loss {result["loss"]:.4f} | accuracy {result["accuracy"]:.4f} | F1 (macro) '
      f'{result["f1_macro"]:.4f} | ROC AUC {auc:.4f} | {int(result["examples"]):,} examples'
    )
