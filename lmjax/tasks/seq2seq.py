"""task='seq2seq': a target text for each source text (summarization,
translation, question answering), over (source, target) pairs
(lmjax.data.pairs).

A decoder-only model (Transformer, LSTM, GRU, RNN, an imported causal model)
learns `source SEP target EOS` with the loss on the target only; an
encoder-decoder (model.family='encoder_decoder') reads the source in its
encoder and the target in its decoder. Both train with the shared step. The
evaluation is the target tokens' loss and perplexity, and the ROUGE-1, -2, -L
and -Lsum F-measures (lmjax.rouge) of targets generated (greedy, sampled or by
beam search, lmjax.generation) for the split's first `seq2seq.eval_examples`
sources, beside those of the lead-3 baseline (the source's first three
sentences) on the same examples.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from lmjax import data as data_layer
from lmjax import evaluation
from lmjax import generation
from lmjax import models
from lmjax import rouge
from lmjax import watchdog
from lmjax.tasks import base

# The data layer (TensorFlow) loads when a task first reads data.
corpora = data_layer.lazy('lmjax.data.corpora')
pairs = data_layer.lazy('lmjax.data.pairs')
pipeline = data_layer.lazy('lmjax.data.pipeline')

ROWS = ('auto', 'packed', 'single')  # seq2seq.rows


def packed_rows(config) -> bool:
  """Whether pairs share rows: 'auto' packs them for Transformers only (a
  recurrent model's state would run from one pair into the next)."""
  if config.seq2seq.rows == 'auto':
    return config.model.family in ('transformer', 'encoder_decoder')
  return config.seq2seq.rows == 'packed'


def separator_ids(config, tokenizer) -> tuple[int, ...]:
  """A decoder-only model's SEP: one token after the tokenizer's vocabulary, or
  seq2seq.separator tokenized; () for an encoder-decoder."""
  if config.model.family == 'encoder_decoder':
    return ()
  if not config.seq2seq.separator:
    return (int(tokenizer.vocab_size),)
  ids = tuple(int(i) for i in tokenizer.encode(config.seq2seq.separator))
  if not ids:
    raise ValueError(f'seq2seq.separator={config.seq2seq.separator!r} encodes to no tokens')
  return ids


def layout(config, tokenizer) -> pairs.Layout:
  s = config.seq2seq
  encoder_decoder = config.model.family == 'encoder_decoder'
  return pairs.Layout(
    seq_len=config.data.seq_len,
    max_target=s.max_target_tokens,
    packed=packed_rows(config),
    eos_id=int(tokenizer.eos_id),
    separator=separator_ids(config, tokenizer),
    target_len=(s.target_len or s.max_target_tokens + 1) if encoder_decoder else 0,
  )


def generate_targets(params, model, tokenizer, config, sources, batch_size: int) -> list[str]:
  """Targets generated for `sources` (texts), as `seq2seq` says (greedy,
  sampled or beam search), `batch_size` at a time."""
  s, rows = config.seq2seq, layout(config, tokenizer)
  vocab_size = tokenizer.vocab_size
  outputs = []
  for start in range(0, len(sources), batch_size):
    prompts = [rows.prompt(tokenizer.encode(text)) for text in sources[start : start + batch_size]]
    kwargs = {}
    if rows.encoder_decoder:
      kwargs['encoder_ids'] = prompts
      prompts = [np.array([tokenizer.eos_id], np.int32)] * len(prompts)
    generated = generation.generate(
      params,
      model,
      prompts,
      s.max_target_tokens + 1,
      vocab_size=vocab_size,
      temperature=s.temperature,
      top_k=0,
      seed=config.seed,
      eos_id=tokenizer.eos_id,
      beam_size=s.beam_size,
      length_penalty=s.length_penalty,
      **kwargs,
    )
    outputs += [generation.decode_sample(tokenizer, row) for row in generated]
    watchdog.beat()
  return outputs


def rouge_report(predictions, references, sources) -> dict:
  """ROUGE of the predictions, and (lead3_ prefixed) of the sources' lead-3."""
  result = rouge.scores(predictions, references)
  lead = rouge.scores([rouge.lead(text) for text in sources], references)
  result.update({f'lead3_{key}': value for key, value in lead.items()})
  result['generated'] = len(predictions)
  return result


class Seq2Seq(base.RowsTask):
  rows_are = 'rows of pairs'
  name = 'seq2seq'
  baseline_name = 'lead-3 ROUGE-L'
  baseline_key = 'lead3_rougeL'
  generates_targets = True

  def generate_targets(self, config, params, model, tokenizer, sources, batch_size: int):
    return generate_targets(params, model, tokenizer, config, sources, batch_size)

  def check(self, config) -> None:
    family = config.model.family
    if family == 'encoder':
      raise ValueError(
        "task='seq2seq' generates text: model.family='encoder' cannot; use a causal "
        "family or 'encoder_decoder'"
      )
    if family in models.recurrent.CELLS and config.seq2seq.rows == 'packed':
      raise ValueError(
        f'model.family={family!r} is recurrent: its state would run from one pair into the '
        "next of a packed row; set seq2seq.rows='single' (or 'auto')"
      )
    if config.data.layout == 'stream':
      raise ValueError(
        "task='seq2seq' lays pairs out by seq2seq.rows; data.layout='stream' (a state "
        'carried across steps) does not apply'
      )
    if config.seq2seq.beam_size < 0:
      raise ValueError(f'seq2seq.beam_size must be 0 or more; got {config.seq2seq.beam_size}')
    if config.seq2seq.eval_examples < -1:
      raise ValueError(
        f'seq2seq.eval_examples must be -1 (all), 0 or more; got {config.seq2seq.eval_examples}'
      )

  def load(self, config, tokenizer, splits=None) -> base.TaskData:
    data = config.data
    train_split, eval_split = splits or (data.train_split, data.eval_split)
    rows = layout(config, tokenizer)
    train, evaluated = (
      pairs.load(data, tokenizer, rows, split, base.log, base.share())
      for split in (train_split, eval_split)
    )
    baseline = float('nan')
    if config.seq2seq.eval_examples:
      texts = evaluated.texts(config.seq2seq.eval_examples)
      baseline = rouge.scores([rouge.lead(s) for s, _ in texts], [t for _, t in texts])['rougeL']
    return base.TaskData(
      train,
      evaluated,
      baseline,
      f'{train.num_pairs:,} training pairs in {len(train):,} rows of {data.seq_len}, '
      f'{evaluated.num_pairs:,} pairs for evaluation',
    )

  def train_texts(self, config):
    for source, target in pairs.examples(config.data, config.data.train_split):
      yield source
      yield target

  def prepare(self, config, tokenizer, split, share=(0, 1), log=print) -> dict:
    path, manifest, prepared = pairs.ensure_split(config.data, tokenizer, split, log, share)
    return {
      'split': split,
      'path': path,
      'tokens': manifest['tokens'],
      'documents': manifest['documents'] // 2,
      'prepared': prepared,
    }

  def load_evaluation(self, config, derived, tokenizer, split) -> base.TaskData:
    rows = layout(config, tokenizer)
    evaluated = pairs.load(config.data, tokenizer, rows, split, base.log, base.share())
    return base.TaskData(None, evaluated, float('nan'), '')

  def batch_shapes(self, config, batch_size: int) -> dict:
    s = config.seq2seq
    encoder_decoder = config.model.family == 'encoder_decoder'
    length = (s.target_len or s.max_target_tokens + 1) if encoder_decoder else config.data.seq_len
    rows = (batch_size, length)
    shapes = {
      'inputs': (rows, np.int32),
      'targets': (rows, np.int32),
      'weights': (rows, np.float32),
      'segment_ids': (rows, np.int32),
      'positions': (rows, np.int32),
    }
    if encoder_decoder:
      source = (batch_size, config.data.seq_len)
      for name in ('encoder_inputs', 'encoder_segment_ids', 'encoder_positions'):
        shapes[name] = (source, np.int32)
    return shapes

  def build_model(self, config, derived):
    # A decoder-only model's own SEP token is one more id after the tokenizer's.
    extra = int(config.model.family != 'encoder_decoder' and not config.seq2seq.separator)
    return models.build_model(config.model, derived.vocab_size + extra, config.data.seq_len)

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
    count = config.seq2seq.eval_examples
    texts = functools.cache(lambda: data.eval.texts(count))

    def evaluate(params, max_batches):
      batches = pipeline.eval_row_batches(
        data.eval.rows, batch_size, max_batches, jax.process_index(), jax.process_count()
      )
      result = evaluation.evaluate_batches(eval_fn, params, batches, mesh)
      if count:
        sources, references = [s for s, _ in texts()], [t for _, t in texts()]
        generated = generate_targets(params, model, tokenizer, config, sources, batch_size)
        result.update(rouge_report(generated, references, sources))
      return result

    return evaluate

  def describe(self, result: dict) -> str:
    line = f'target loss {result["loss"]:.4f} | perplexity {result["perplexity"]:.2f}'
    if 'rouge1' in result:
      line += (
        f' | ROUGE-1/2/L {100 * result["rouge1"]:.1f}/{100 * result["rouge2"]:.1f}/'
        f'{100 * result["rougeL"]:.1f} over {result["generated"]} generated (lead-3 '
        f'{100 * result["lead3_rouge1"]:.1f}/{100 * result["lead3_rouge2"]:.1f}/'
        f'{100 * result["lead3_rougeL"]:.1f})'
      )
    return line + f' | {int(result["tokens"]):,} target tokens'
