"""Text pairs for text-to-text tasks (task='seq2seq'): (source, target) examples
from a tfds corpus with two text features (`data.source_key`,
`data.target_key`: cnn_dailymail's article and highlights, xsum's document and
summary) or from local CSV, TSV or JSONL files (fields `source` and `target` by
default). Each split is tokenized once into a token store of examples
(lmjax.data.store: each pair's source and target in turn), and laid out as
rows on demand (`PairRows`).

A decoder-only model reads a pair as one sequence, the loss on the target only:

    inputs   EOS s1 .. sn SEP t1 .. tm
    targets  s1 .. sn SEP t1 .. tm EOS
    weights  0  ..  0  0   1  ..  1  1

An encoder-decoder reads `s1 .. sn EOS` in its encoder row and `EOS t1 .. tm`
(inputs) / `t1 .. tm EOS` (targets) in its decoder row. The target keeps its
first `seq2seq.max_target_tokens` tokens and the source what then fits.

Packed rows hold several pairs side by side, each its own segment (1, 2, ...;
0 = padding) with positions restarting: attention stays within a pair, and an
encoder-decoder's two rows give a pair the same segment id, so cross-attention
does too. Pairs are placed in corpus order into the first of the last
`OPEN_ROWS` rows they fit in, so the rows are a pure function of the split and
the layout: deterministic, and a run resumed at step k reads the batches of an
uninterrupted run (lmjax.data.pipeline.row_batches).
"""

import dataclasses
import itertools
from collections.abc import Iterator

import numpy as np

from lmjax.data import cleaning
from lmjax.data import corpora
from lmjax.data import labelled
from lmjax.data import packing
from lmjax.data import store

OPEN_ROWS = packing.OPEN_ROWS


def _file_pairs(data_config, split: str) -> Iterator[tuple[str, str]]:
  keys = (data_config.source_key, data_config.target_key)
  for path, start, end in corpora.checked_parts(data_config, split):
    records = labelled.read_records(path, keys, 'data.source_key and data.target_key')
    position = np.arange(len(records)) / len(records)
    for (source, target), p in zip(records, position):
      if start <= p < end:
        yield source, str(target)


def _tfds_pairs(data_config, split: str) -> Iterator[tuple[str, str]]:
  keys = (data_config.source_key, data_config.target_key)
  dataset, _ = corpora.tfds_examples(data_config, split, keys)
  for example in dataset.prefetch(2).as_numpy_iterator():
    yield tuple(example[k].decode('utf-8', errors='replace') for k in keys)


def examples(data_config, split: str) -> Iterator[tuple[str, str]]:
  """The split's (source, target) pairs, streamed, cleaned as for language
  modelling (every pair kept)."""
  source = _file_pairs if data_config.name == 'files' else _tfds_pairs
  for text, target in source(data_config, split):
    yield cleaning.clean(text, data_config.clean), cleaning.clean(target, data_config.clean)


def first_examples(data_config, split: str, count: int) -> list[tuple[str, str]]:
  """The split's first `count` pairs (all of them for count < 0)."""
  pairs = examples(data_config, split)
  return list(pairs if count < 0 else itertools.islice(pairs, count))


def _fields(data_config) -> str:
  return f'{data_config.source_key},{data_config.target_key}'


def ensure_split(data_config, tokenizer, split: str, log=print, share=(0, 1)):
  """(path, manifest, whether this call prepared shards) of the split's token
  store of pairs, prepared first if missing; one log line."""

  def texts():
    for source, target in examples(data_config, split):
      yield source
      yield target

  path, manifest, prepared = store.ensure(
    data_config, split, tokenizer, texts, share, log, fields=_fields(data_config)
  )
  log(
    f'token store {"prepared" if prepared else "reused"} for text pairs of split {split!r}: '
    f'{manifest["documents"] // 2:,} pairs, {manifest["tokens"]:,} tokens ({path})'
  )
  return path, manifest, prepared


@dataclasses.dataclass(frozen=True)
class Layout:
  """How pairs become rows. `target_len` > 0 is an encoder-decoder's decoder row
  length (its encoder rows are `seq_len` long); 0 is a decoder-only model's
  single row of `seq_len`, with `separator` (token ids) between source and target."""

  seq_len: int
  max_target: int
  packed: bool
  eos_id: int
  separator: tuple = ()
  target_len: int = 0

  @property
  def encoder_decoder(self) -> bool:
    return self.target_len > 0

  def check(self) -> None:
    if self.max_target < 1:
      raise ValueError(f'seq2seq.max_target_tokens must be positive; got {self.max_target}')
    if self.encoder_decoder:
      if self.target_len > self.seq_len:
        raise ValueError(
          f'seq2seq.target_len={self.target_len} is longer than data.seq_len={self.seq_len} '
          '(the positions the model has)'
        )
      return
    room = self.source_budget
    if room < 1:
      raise ValueError(
        f'data.seq_len={self.seq_len} leaves no room for the source: a row holds EOS, '
        f'the source, {len(self.separator)} separator token(s), up to '
        f'seq2seq.max_target_tokens={self.max_target} target tokens and EOS; raise '
        'data.seq_len or lower seq2seq.max_target_tokens'
      )

  @property
  def source_budget(self) -> int:
    """Source tokens a generation prompt keeps (the target may use all of max_target)."""
    if self.encoder_decoder:
      return self.seq_len - 1
    return self.seq_len - len(self.separator) - 2 - self.max_target

  def kept(self, source_lengths, target_lengths) -> tuple[np.ndarray, np.ndarray]:
    """The source and target tokens each pair keeps in training rows."""
    if self.encoder_decoder:
      target = np.minimum(target_lengths, min(self.max_target, self.target_len - 1))
      return np.minimum(source_lengths, self.seq_len - 1), target
    target = np.minimum(target_lengths, self.max_target)
    room = self.seq_len - len(self.separator) - 2 - target
    return np.minimum(source_lengths, room), target

  def prompt(self, source_ids) -> np.ndarray:
    """What generation starts from: a decoder-only model's `EOS source SEP`, or
    an encoder-decoder's encoder input `source EOS`."""
    source = np.asarray(source_ids, np.int32)[: self.source_budget]
    if self.encoder_decoder:
      return np.concatenate([source, [self.eos_id]]).astype(np.int32)
    return np.concatenate([[self.eos_id], source, self.separator]).astype(np.int32)


def assign_rows(sizes: np.ndarray, capacity: np.ndarray, packed: bool):
  """(row offsets [rows + 1], example order [n]): row r holds examples
  order[offsets[r]:offsets[r + 1]]. `sizes` [n, k] are what each example takes
  of a row's k capacities; packed, each goes into the oldest of the last
  OPEN_ROWS rows with room (first fit), else starts a row."""
  n = len(sizes)
  if not packed:
    return np.arange(n + 1, dtype=np.int64), np.arange(n, dtype=np.int64)
  rows, open_rows = [], []  # rows: example lists; open_rows: [row, used] with room
  for i, size in enumerate(sizes.tolist()):
    slot = next(
      (r for r in open_rows if all(u + s <= c for u, s, c in zip(r[1], size, capacity))), None
    )
    if slot is None:
      slot = [len(rows), [0] * len(size)]
      rows.append([])
      open_rows.append(slot)
      if len(open_rows) > OPEN_ROWS:
        open_rows.pop(0)
    rows[slot[0]].append(i)
    slot[1] = [u + s for u, s in zip(slot[1], size)]
    if any(u == c for u, c in zip(slot[1], capacity)):
      open_rows.remove(slot)  # full: nothing more fits (every pair takes a token of each)
  lengths = np.array([len(r) for r in rows], np.int64)
  order = np.fromiter(itertools.chain.from_iterable(rows), np.int64, count=n)
  return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64), order


class PairRows:
  """A split's pairs as rows (see the module doc): len() rows, take(indices) ->
  the batch arrays; `tokens(i)` -> pair i's (source, target) ids."""

  def __init__(self, examples_: store.Examples, offsets: np.ndarray, layout: Layout):
    self.examples, self.layout = examples_, layout
    lengths = np.diff(offsets)
    self.source_lengths, self.target_lengths = lengths[0::2], lengths[1::2]
    self.kept = layout.kept(self.source_lengths, self.target_lengths)
    source, target = self.kept
    if layout.encoder_decoder:
      sizes = np.stack([source + 1, target + 1], axis=1)
      capacity = np.array([layout.seq_len, layout.target_len])
    else:
      sizes = (source + target + len(layout.separator) + 2)[:, None]
      capacity = np.array([layout.seq_len])
    self.offsets, self.order = assign_rows(sizes, capacity, layout.packed)

  @property
  def num_pairs(self) -> int:
    return len(self.source_lengths)

  def __len__(self) -> int:
    return len(self.offsets) - 1

  def tokens(self, index: int, source_limit: int = -1, target_limit: int = -1):
    """Pair `index`'s source and target ids (their first `*_limit` tokens)."""
    limit = lambda n, k: n if k < 0 else min(n, k)
    source = self.examples.tokens_of(2 * index, limit(self.source_lengths[index], source_limit))
    target = self.examples.tokens_of(2 * index + 1, limit(self.target_lengths[index], target_limit))
    return source.astype(np.int32), target.astype(np.int32)

  def _planes(self, length: int, count: int) -> dict:
    zeros = lambda dtype: np.zeros((count, length), dtype)
    return {
      'inputs': zeros(np.int32),
      'targets': zeros(np.int32),
      'weights': zeros(np.float32),
      'segment_ids': zeros(np.int32),
      'positions': zeros(np.int32),
    }

  def take(self, indices) -> dict:
    indices = np.asarray(indices, np.int64).reshape(-1)
    layout, eos = self.layout, self.layout.eos_id
    if layout.encoder_decoder:
      batch = self._planes(layout.target_len, len(indices))
      encoder = self._planes(layout.seq_len, len(indices))
      batch.update(
        encoder_inputs=encoder['inputs'],
        encoder_segment_ids=encoder['segment_ids'],
        encoder_positions=encoder['positions'],
      )
    else:
      batch = self._planes(layout.seq_len, len(indices))
    separator = np.asarray(layout.separator, np.int32)
    for row, r in enumerate(indices.tolist()):
      column = encoder_column = 0
      for segment, i in enumerate(self.order[self.offsets[r] : self.offsets[r + 1]].tolist(), 1):
        source, target = self.tokens(i, int(self.kept[0][i]), int(self.kept[1][i]))
        if layout.encoder_decoder:
          encoded = np.concatenate([source, [eos]])
          span = slice(encoder_column, encoder_column + len(encoded))
          batch['encoder_inputs'][row, span] = encoded
          batch['encoder_segment_ids'][row, span] = segment
          batch['encoder_positions'][row, span] = np.arange(len(encoded))
          encoder_column += len(encoded)
          sequence, loss_from = target, 0
        else:
          sequence = np.concatenate([source, separator, target])
          loss_from = len(source) + len(separator)
        targets = np.concatenate([sequence, [eos]])
        inputs = np.concatenate([[eos], sequence])
        span = slice(column, column + len(targets))
        batch['inputs'][row, span] = inputs
        batch['targets'][row, span] = targets
        batch['weights'][row, column + loss_from : span.stop] = 1.0
        batch['segment_ids'][row, span] = segment
        batch['positions'][row, span] = np.arange(len(targets))
        column = span.stop
    return batch

  def __getitem__(self, name: str) -> np.ndarray:
    return self.take(np.arange(len(self)))[name]


@dataclasses.dataclass(frozen=True)
class PairSplit:
  """One split of pairs: its rows, and where its texts come from (for the
  references and sources of generation)."""

  rows: PairRows
  data_config: object
  split: str

  def __len__(self) -> int:
    return len(self.rows)

  @property
  def num_pairs(self) -> int:
    return self.rows.num_pairs

  def texts(self, count: int) -> list[tuple[str, str]]:
    return first_examples(self.data_config, self.split, count)


def load(data_config, tokenizer, layout: Layout, split: str, log=print, share=(0, 1)) -> PairSplit:
  """The split's pairs as rows, from its token store (prepared first if missing)."""
  layout.check()
  path, manifest, _ = ensure_split(data_config, tokenizer, split, log, share)
  rows = PairRows(store.Examples(path, manifest), store.document_offsets(path, manifest), layout)
  return PairSplit(rows, data_config, split)
