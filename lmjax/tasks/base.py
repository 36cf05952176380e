"""The interface every task implements, and what the tasks share.

A task is a small stateless object; `lmjax.tasks.get(config.task)` returns the
run's. The train loop, `lmjax.evaluate` and `--compile_only` call only these
methods, so a new task is one new module registered in `lmjax/tasks/__init__.py`,
with no edit in the loop, the evaluation or the steps. Every task trains with
the same step (`steps.train_step`): a weighted cross-entropy of the model's
logits against `targets` (one per token for a language model, one per row for
a classifier), so the step needs no task switch either.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from collections.abc import Iterator
from typing import Any

import jax

from lmjax import data as data_layer
from lmjax import derived as derived_lib
from lmjax import models

# The data layer (TensorFlow) loads when a task first reads data.
corpora = data_layer.lazy('lmjax.data.corpora')
pipeline = data_layer.lazy('lmjax.data.pipeline')


def log(message: str) -> None:
  """Token-store lines, on stderr (lmjax.evaluate's stdout is its JSON). Every
  process says what it prepares (its share differs); process 0 the rest."""
  if jax.process_count() == 1:
    print(message, file=sys.stderr, flush=True)
  elif message.startswith('token store: preparing') or jax.process_index() == 0:
    print(f'[process {jax.process_index()}] {message}', file=sys.stderr, flush=True)


def share() -> tuple[int, int]:
  """This process' share of a token store's shards to prepare."""
  return jax.process_index(), jax.process_count()


def require_no_encoder_decoder(config, task: str) -> None:
  """An encoder-decoder maps a source to a target: it serves task='seq2seq' only."""
  if config.model.family == 'encoder_decoder':
    raise ValueError(
      f"model.family='encoder_decoder' maps a source text to a target: it serves "
      f"task='seq2seq', not task={task!r}"
    )


@dataclasses.dataclass
class TaskData:
  """A task's training and evaluation splits (train is None when only
  evaluating), its baseline (`Task.baseline_name`) and a log line about them."""

  train: Any  # the task's split type: pipeline.TokenStream, labelled.LabelledSplit
  eval: Any
  baseline: float
  description: str


class Task:
  """What a run learns: its data, batches, model, evaluation and baseline."""

  name: str  # the value of config.task
  baseline_name: str  # what TaskData.baseline measures, for the log
  baseline_key: str  # its key in the final evaluation's metrics
  generates_text: bool = False  # sample text at the end of training (lmjax.sample)
  generates_targets: bool = False  # lmjax.sample maps each prompt (a source) to a target

  def generate_targets(self, config, params, model, tokenizer, sources, batch_size: int):
    """A target text per source text (tasks that generate targets)."""
    raise NotImplementedError

  def check(self, config) -> None:
    """Raises ValueError if the family or layout cannot serve this task (no I/O)."""

  def load(self, config, tokenizer, splits: tuple[str, str] | None = None) -> TaskData:
    """Reads the training and evaluation splits (`splits` overrides the config's)."""
    raise NotImplementedError

  def train_texts(self, config) -> Iterator[str]:
    """The training split's texts, streamed: what a new vocabulary is built from."""
    return pipeline.texts(config.data, config.data.train_split)

  def prepare(self, config, tokenizer, split: str, share=(0, 1), log=print) -> dict:
    """Prepares (or finds) the split's token store, this process preparing its
    `share` of the shards (lmjax.prepare); returns a summary: split, path,
    tokens, documents, prepared (whether this call wrote shards)."""
    raise NotImplementedError

  def load_evaluation(self, config, derived: derived_lib.Derived, tokenizer, split) -> TaskData:
    """Only the split to evaluate, with what the training split derived."""
    raise NotImplementedError

  def steps_per_epoch(self, config, data: TaskData) -> int:
    raise NotImplementedError

  def derive(self, config, tokenizer, data: TaskData) -> derived_lib.Derived:
    """The run's derived record, from the config and the loaded data."""
    per_epoch = self.steps_per_epoch(config, data)
    return derived_lib.Derived(
      vocab_size=tokenizer.vocab_size,
      steps_per_epoch=per_epoch,
      num_steps=derived_lib.num_steps(config, per_epoch),
    )

  def from_shapes(self, config, vocab_size: int) -> derived_lib.Derived:
    """The record of a run compiled or benchmarked without data: the configured
    length, an epoch counted as one step."""
    return derived_lib.Derived(vocab_size, 1, derived_lib.num_steps(config, 1))

  def train_batches(self, config, data: TaskData, start_step: int) -> Iterator[dict]:
    """This process' rows of the batches of steps start_step, start_step + 1, ..."""
    raise NotImplementedError

  def batch_shapes(self, config, batch_size: int) -> dict:
    """{name: (shape, dtype)} of a training batch (for compiling without data)."""
    raise NotImplementedError

  def build_model(self, config, derived: derived_lib.Derived):
    """The run's Flax module."""
    return models.build_model(config.model, derived.vocab_size, config.data.seq_len)

  def make_evaluator(
    self,
    config,
    derived: derived_lib.Derived,
    data: TaskData,
    model,
    tokenizer,
    param_shardings,
    mesh,
    carry: bool = False,
    batch_size: int = 0,
  ) -> Callable[[Any, int], dict]:
    """(params, max_batches) -> metrics of `data.eval` (batch_size 0: the config's)."""
    raise NotImplementedError

  def describe(self, result: dict) -> str:
    """One log line's worth of an evaluation."""
    raise NotImplementedError


class RowsTask(Task):
  """A task whose training split is whole rows read by index (`data.train.rows`:
  labelled texts, text pairs): an epoch is its full batches, and the batches of
  a step are `pipeline.row_batches`'. `rows_are` names the rows in errors."""

  rows_are = 'examples'

  def steps_per_epoch(self, config, data) -> int:
    per_epoch = len(data.train) // config.train.batch_size
    if not per_epoch:
      raise corpora.CorpusError(
        f'the training split has {len(data.train)} {self.rows_are}; one batch needs '
        f'{config.train.batch_size}'
      )
    return per_epoch

  def train_batches(self, config, data, start_step):
    return pipeline.row_batches(
      data.train.rows,
      config.train.batch_size,
      config.seed,
      start_step,
      jax.process_index(),
      jax.process_count(),
    )
