"""tf.data input pipeline: documents -> tokens -> fixed-length examples -> batches.

Training batches are a pure function of (seed, step): each split is tokenized
once into one stream (documents joined by the end-of-document token) and cut
into windows of `seq_len + 1` tokens; every epoch visits the windows in its own
seeded permutation (tf.random stateless shuffle) with its own random offset.
So a run resumed at step k reads exactly the batches an uninterrupted run
reads at steps k, k+1, ..., without saving any iterator state, and without
replaying the k earlier batches. Each process keeps only its rows of every
global batch.
"""
import dataclasses
from typing import Iterator

import numpy as np
import tensorflow as tf

from lmjax.data import cleaning
from lmjax.data import corpora

_ENCODE_BATCH = 256  # Documents tokenized per call (sentencepiece runs them in parallel).


@dataclasses.dataclass(frozen=True)
class TokenStream:
  """One split as a single token stream."""
  tokens: np.ndarray  # [num_tokens] int32
  num_documents: int
  num_bytes: int  # UTF-8 bytes of the text the tokens encode.


def texts(data_config, split: str) -> Iterator[str]:
  """The split's documents as cleaned Python strings (too-short ones dropped)."""
  dataset = corpora.documents(data_config, split).batch(_ENCODE_BATCH).prefetch(2)
  for batch in dataset.as_numpy_iterator():
    for raw in batch:
      text = cleaning.clean(raw.decode('utf-8', errors='replace'), data_config.clean)
      if cleaning.keep(text, data_config.clean):
        yield text


def tokenize_split(data_config, tokenizer, split: str) -> TokenStream:
  """Tokenizes a whole split (documents joined by EOS when append_eos)."""
  pieces, num_documents, num_bytes = [], 0, 0
  eos = np.array([tokenizer.eos_id], np.int32)
  batch = []

  def flush():
    for ids in tokenizer.encode_batch(batch):
      pieces.append(ids)
      if data_config.append_eos:
        pieces.append(eos)
    batch.clear()

  for text in texts(data_config, split):
    num_documents += 1
    num_bytes += len(text.encode('utf-8'))
    batch.append(text)
    if len(batch) == _ENCODE_BATCH:
      flush()
  flush()
  if num_documents == 0:
    raise corpora.CorpusError(f'split {split!r} of corpus {data_config.name!r} has no text')
  tokens = np.concatenate(pieces).astype(np.int32)
  return TokenStream(tokens=tokens, num_documents=num_documents, num_bytes=num_bytes)


def _local_rows(global_batch: int, process_index: int, process_count: int) -> slice:
  if global_batch % process_count:
    raise ValueError(f'global batch {global_batch} does not divide evenly over '
                     f'{process_count} processes')
  per_process = global_batch // process_count
  return slice(process_index * per_process, (process_index + 1) * per_process)


def windows_per_epoch(num_tokens: int, seq_len: int) -> int:
  # Room for a random offset in [0, seq_len) and the one-token target shift.
  return max(0, (num_tokens - 1 - seq_len) // seq_len)


def train_batches(stream: TokenStream, seq_len: int, global_batch: int, seed: int,
                  start_step: int = 0, process_index: int = 0,
                  process_count: int = 1) -> Iterator[dict]:
  """Infinite training batches from `start_step` on: this process' rows.

  Yields dicts of numpy arrays: inputs, targets [rows, seq_len] int32 and
  weights [rows, seq_len] float32.
  """
  rows = _local_rows(global_batch, process_index, process_count)
  per_epoch = windows_per_epoch(len(stream.tokens), seq_len)
  if per_epoch < global_batch:
    needed = (global_batch + 1) * seq_len + 1
    raise corpora.CorpusError(
        f'the training split has {len(stream.tokens)} tokens; one batch of {global_batch} x '
        f'{seq_len} needs at least {needed}')
  first_example = start_step * global_batch
  first_epoch, skip = divmod(first_example, per_epoch)
  tokens = tf.constant(stream.tokens)

  def epoch_starts(epoch):
    epoch_seed = tf.stack([tf.constant(seed, tf.int64), epoch])
    order = tf.random.experimental.stateless_shuffle(
        tf.range(per_epoch, dtype=tf.int64), seed=epoch_seed)
    offset = tf.random.stateless_uniform([], seed=epoch_seed + 1, maxval=seq_len, dtype=tf.int64)
    return tf.data.Dataset.from_tensor_slices(order * seq_len + offset)

  def gather(starts):
    starts = starts[rows.start:rows.stop]
    index = starts[:, None] + tf.range(seq_len + 1, dtype=tf.int64)[None, :]
    window = tf.gather(tokens, index)
    return {'inputs': window[:, :-1], 'targets': window[:, 1:],
            'weights': tf.ones([rows.stop - rows.start, seq_len], tf.float32)}

  dataset = (tf.data.Dataset.range(first_epoch, 2**62)
             .flat_map(epoch_starts)
             .skip(skip)
             .batch(global_batch, drop_remainder=True)
             .map(gather, num_parallel_calls=1)
             .prefetch(4))
  options = tf.data.Options()
  options.deterministic = True
  options.threading.private_threadpool_size = 2  # XLA needs the cores more.
  return dataset.with_options(options).as_numpy_iterator()


def eval_batches(stream: TokenStream, seq_len: int, global_batch: int,
                 max_batches: int = -1, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict]:
  """Every target token of the split exactly once, in order; padding weighs 0."""
  rows = _local_rows(global_batch, process_index, process_count)
  tokens = stream.tokens
  num_targets = len(tokens) - 1
  num_windows = -(-num_targets // seq_len)
  num_batches = -(-num_windows // global_batch)
  if max_batches >= 0:
    num_batches = min(num_batches, max_batches)
  padded = np.zeros(num_batches * global_batch * seq_len + 1, np.int32)
  weights = np.zeros(num_batches * global_batch * seq_len, np.float32)
  used = min(len(tokens), len(padded))
  padded[:used] = tokens[:used]
  weights[:used - 1] = 1.0
  inputs = padded[:-1].reshape(num_batches, global_batch, seq_len)
  targets = padded[1:].reshape(num_batches, global_batch, seq_len)
  weights = weights.reshape(num_batches, global_batch, seq_len)
  for i in range(num_batches):
    yield {'inputs': inputs[i, rows], 'targets': targets[i, rows], 'weights': weights[i, rows]}


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
  """Entropy (nats/token) of the stream's unigram distribution: a baseline loss."""
  counts = np.bincount(tokens, minlength=vocab_size).astype(np.float64)
  probs = counts[counts > 0] / counts.sum()
  return float(-(probs * np.log(probs)).sum())
