"""Language-model tasks over a token stream, in any layout.

lm   next-token prediction with a causal model (Transformer or recurrent);
     the baseline is the unigram entropy.
mlm  masked-token prediction with the bidirectional encoder: the same stream
     and layouts, BERT masking in tf.data (pipeline.Masking); loss and
     accuracy on the chosen positions only.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from lmjax import data as data_layer
from lmjax import evaluation
from lmjax import models
from lmjax.tasks import base

# The data layer (TensorFlow) loads when a task first reads data.
pipeline = data_layer.lazy('lmjax.data.pipeline')


def _packed_len(data_config) -> int:
  """The row length the store packs to (0: the layout reads no packed rows)."""
  return data_config.seq_len if data_config.layout == 'packed' else 0


@dataclasses.dataclass
class StreamData(base.TaskData):
  """Token streams of the splits; `masking` is the mlm objective's (None for lm)."""

  masking: pipeline.Masking | None = None


class NextToken(base.Task):
  """task='lm'."""

  name = 'lm'
  baseline_name = 'unigram entropy'  # nats/token
  baseline_key = 'unigram_entropy'
  generates_text = True

  def check(self, config) -> None:
    if config.model.family == 'encoder':
      raise ValueError(
        "model.family='encoder' is bidirectional: it cannot predict the next "
        "token; use task='mlm' (or 'classify')"
      )
    base.require_no_encoder_decoder(config, self.name)

  def masking(self, config, vocab_size: int) -> pipeline.Masking | None:
    return None

  def load(self, config, tokenizer, splits=None) -> StreamData:
    data = config.data
    train_split, eval_split = splits or (data.train_split, data.eval_split)
    train, evaluated = (
      pipeline.stored_split(data, tokenizer, split, base.log, base.share(), _packed_len(data))
      for split in (train_split, eval_split)
    )
    return StreamData(
      train,
      evaluated,
      pipeline.stream_unigram_entropy(train, tokenizer.vocab_size),
      f'train {len(train.tokens):,} tokens in {train.num_documents:,} documents, '
      f'eval {len(evaluated.tokens):,} tokens',
      self.masking(config, tokenizer.vocab_size),
    )

  def prepare(self, config, tokenizer, split, share=(0, 1), log=print) -> dict:
    data = config.data
    prepared = pipeline.ensure_split(data, tokenizer, split, log, share, _packed_len(data))
    summary = {
      'split': split,
      'path': prepared.path,
      'tokens': prepared.manifest['tokens'],
      'documents': prepared.manifest['documents'],
      'prepared': prepared.prepared,
    }
    if prepared.packed_manifest is not None:  # the rows training reads, packed once here
      summary.update(packed_path=prepared.packed_path, packed_rows=prepared.packed_manifest['rows'])
    return summary

  def load_evaluation(self, config, derived, tokenizer, split) -> StreamData:
    evaluated = pipeline.stored_split(
      config.data, tokenizer, split, base.log, base.share(), _packed_len(config.data)
    )
    return StreamData(None, evaluated, float('nan'), '', self.masking(config, tokenizer.vocab_size))

  def steps_per_epoch(self, config, data) -> int:
    return pipeline.require_steps_per_epoch(
      data.train, config.data.seq_len, config.train.batch_size, config.data.layout
    )

  def train_batches(self, config, data, start_step):
    return pipeline.train_batches(
      data.train,
      config.data.seq_len,
      config.train.batch_size,
      config.seed,
      start_step,
      jax.process_index(),
      jax.process_count(),
      config.data.layout,
      data.masking,
    )

  def batch_shapes(self, config, batch_size: int) -> dict:
    rows = (batch_size, config.data.seq_len)
    shapes = {
      'inputs': (rows, np.int32),
      'targets': (rows, np.int32),
      'weights': (rows, np.float32),
    }
    if config.data.layout == 'packed':
      shapes.update(segment_ids=(rows, np.int32), positions=(rows, np.int32))
    elif config.data.layout == 'stream':
      shapes['reset'] = ((batch_size,), np.float32)
    return shapes

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
    eval_fn = evaluation.make_eval_fn(model, tokenizer, param_shardings, mesh)
    batch_size = batch_size or config.train.eval_batch_size
    return lambda params, max_batches: evaluation.evaluate(
      eval_fn,
      params,
      data.eval,
      config.data.seq_len,
      batch_size,
      mesh,
      max_batches,
      config.data.layout,
      model,
      carry,
      data.masking,
      config.seed,
    )

  def describe(self, result: dict) -> str:
    return (
      f'loss {result["loss"]:.4f} | perplexity {result["perplexity"]:.2f} | bits/byte '
      f'{result["bits_per_byte"]:.3f} | accuracy {result["accuracy"]:.3f} | '
      f'{int(result["tokens"]):,} tokens'
    )


class MaskedToken(NextToken):
  """task='mlm': the stream and evaluation of 'lm', on the masked positions."""

  name = 'mlm'
  generates_text = False

  def check(self, config) -> None:
    models.mask_token_id(config.model, 0)  # raises unless the family is 'encoder'
    if config.data.layout == 'stream':
      raise ValueError("task='mlm' reads 'windows' or 'packed' rows, not 'stream'")

  def masking(self, config, vocab_size: int) -> pipeline.Masking:
    return pipeline.Masking.from_config(
      config.mlm, models.mask_token_id(config.model, vocab_size), vocab_size
    )
