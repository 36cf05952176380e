"""Input pipeline: documents (tf.data) -> tokens -> fixed-length examples -> batches.

Each split is tokenized once into one stream (documents joined by the
end-of-document token), kept in its token store (lmjax.data.store), then
laid out as examples of `seq_len` tokens in one of three layouts
(`data.layout`):

  windows  windows of the stream (crossing document boundaries, as nanoGPT
           does); every epoch visits them in its own keyed permutation
           (computed one index at a time) with its own random offset.
  packed   each document (a leading end-of-document token as its first input,
           the end-of-document token as its last target) greedily packed into
           rows, with `segment_ids` (1, 2, ... per row; 0 = padding) and
           `positions` that restart at every document, so attention is masked
           between documents and padding carries no loss; rows are shuffled
           per epoch. The rows are packed once, with the token store, and
           stored beside its tokens (lmjax.data.packing, store.ensure_packed).
  stream   the stream cut into `batch` contiguous rows; consecutive steps
           continue each row where the previous step stopped (stateful
           recurrent training), and `reset` marks the first step of an epoch.

Training batches are a pure function of (seed, step), computed from the step
number (numpy, on a background thread), reading only this process' rows. A
run resumed at step k therefore reads exactly the batches an uninterrupted run
reads at steps k, k+1, ..., with no iterator state to save and no replay of
the k earlier batches; the checkpoint's step *is* the pipeline's position.
"""

import dataclasses
import queue
import threading
from collections.abc import Callable
from collections.abc import Iterator

import numpy as np
import tensorflow as tf

from lmjax.data import cleaning
from lmjax.data import corpora
from lmjax.data import index_shuffle
from lmjax.data import packing
from lmjax.data import store

_ENCODE_BATCH = 256  # Documents tokenized per call (sentencepiece runs them in parallel).
LAYOUTS = packing.LAYOUTS


@dataclasses.dataclass(frozen=True)
class TokenStream:
  """One split as a single token stream."""

  tokens: np.ndarray  # [num_tokens] int32 (or a token store's store.Tokens)
  num_documents: int
  num_bytes: int  # UTF-8 bytes of the text the tokens encode.
  doc_starts: np.ndarray | None = None  # [num_documents + 1] offsets (None = one document)
  eos_id: int = 0  # The end-of-document token (starts every packed document).
  unigram_counts: np.ndarray | None = None  # [vocab] token counts, when the store has them
  # seq_len -> packed rows: computed on first use, or the store's (store.PackedRows).
  packed_rows: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)
  # Reads the offsets of a stored stream's documents when they are first needed.
  offsets_loader: Callable[[], np.ndarray] | None = dataclasses.field(
    default=None, compare=False, repr=False
  )
  _cache: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

  def document_offsets(self) -> np.ndarray:
    if self.doc_starts is not None:
      return np.asarray(self.doc_starts, np.int64)
    if self.offsets_loader is not None:
      if 'offsets' not in self._cache:
        self._cache['offsets'] = self.offsets_loader()
      return self._cache['offsets']
    return np.array([0, len(self.tokens)], np.int64)

  def packed(self, seq_len: int):
    """The stream's documents packed into rows of `seq_len`: the token store's
    rows (prepared with the store), else packed in memory once."""
    if seq_len not in self.packed_rows:
      self.packed_rows[seq_len] = pack(self, seq_len)
    return self.packed_rows[seq_len]


def texts(data_config, split: str) -> Iterator[str]:
  """The split's documents as cleaned Python strings (too-short ones dropped)."""
  # Whole files can be large: read them one at a time (memory bounded by a file).
  whole_files = data_config.name == 'files' and not data_config.documents
  batch = 1 if whole_files else _ENCODE_BATCH
  dataset = corpora.documents(data_config, split).batch(batch).prefetch(2)
  for batch in dataset.as_numpy_iterator():
    for raw in batch:
      text = cleaning.clean(raw.decode('utf-8', errors='replace'), data_config.clean)
      if cleaning.keep(text, data_config.clean):
        yield text


@dataclasses.dataclass(frozen=True)
class SplitStore:
  """A split's prepared token store, and its packed rows when asked for."""

  path: str
  manifest: dict
  prepared: bool  # this call wrote tokens or rows
  packed_path: str = ''
  packed_manifest: dict | None = None


def ensure_split(
  data_config, tokenizer, split: str, log=print, share=(0, 1), packed_len: int = 0
) -> SplitStore:
  """Prepares (or finds) the split's token store, this process preparing its
  `share` of the shards, and with `packed_len` > 0 its rows packed to that
  length; says which in one log line each, with the counts."""
  path, manifest, prepared = store.ensure(
    data_config, split, tokenizer, lambda: texts(data_config, split), share, log
  )
  log(
    f'token store {"prepared" if prepared else "reused"} for split {split!r}: '
    f'{manifest["tokens"]:,} tokens in {manifest["documents"]:,} documents ({path})'
  )
  if not packed_len:
    return SplitStore(path, manifest, prepared)
  packed, packed_manifest, packed_now = store.ensure_packed(
    path, manifest, packed_len, int(tokenizer.eos_id), share, log
  )
  log(
    f'token store {"packed" if packed_now else "reused packed rows"} for split {split!r}: '
    f'{packed_manifest["rows"]:,} rows of {packed_len} ({packed})'
  )
  return SplitStore(path, manifest, prepared or packed_now, packed, packed_manifest)


def stored_split(
  data_config,
  tokenizer,
  split: str,
  log=print,
  share: tuple[int, int] = (0, 1),
  packed_len: int = 0,
) -> TokenStream:
  """The split's token stream read from its token store (lmjax.data.store),
  which is prepared first if it is missing (`ensure_split`): a run that
  restarts reads its tokens instead of tokenizing the split again, and reads
  only the windows it trains on. `packed_len` > 0 also prepares (or finds) the
  store's rows packed to that length, which `packed(packed_len)` then reads row
  by row. With one shard, equal token for token to `tokenize_split`."""
  split_store = ensure_split(data_config, tokenizer, split, log, share, packed_len)
  path, manifest = split_store.path, split_store.manifest
  rows = {}
  if packed_len:
    rows[packed_len] = store.PackedRows(split_store.packed_path, split_store.packed_manifest)
  return TokenStream(
    tokens=store.Tokens(path, manifest),
    num_documents=manifest['documents'],
    num_bytes=manifest['bytes'],
    eos_id=int(tokenizer.eos_id),
    unigram_counts=np.asarray(manifest['unigrams'], np.int64),
    packed_rows=rows,
    offsets_loader=lambda: store.document_offsets(path, manifest),
  )


def tokenize_split(data_config, tokenizer, split: str) -> TokenStream:
  """Tokenizes a whole split (documents joined by EOS when append_eos)."""
  pieces, lengths, num_documents, num_bytes = [], [], 0, 0
  eos = np.array([tokenizer.eos_id], np.int32)
  batch = []

  def flush():
    for ids in tokenizer.encode_batch(batch):
      pieces.append(ids)
      if data_config.append_eos:
        pieces.append(eos)
      lengths.append(len(ids) + int(data_config.append_eos))
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
  return TokenStream(
    tokens=tokens,
    num_documents=num_documents,
    num_bytes=num_bytes,
    doc_starts=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
    eos_id=int(tokenizer.eos_id),
  )


def pack(stream: TokenStream, seq_len: int) -> dict:
  """The stream's documents packed in memory, in corpus order
  (lmjax.data.packing): numpy arrays [rows, seq_len] of inputs, targets
  (int32), segment_ids (int32, 1.. per row, 0 = padding), positions (int32)
  and weights (float32)."""
  tokens = np.asarray(stream.tokens)  # a stored stream is read whole here
  rows = []
  packing.pack_documents(
    [stream.document_offsets()], lambda lo, hi: tokens[lo:hi], seq_len, stream.eos_id, rows.append
  )
  if not rows:
    return packing.as_dict(np.zeros((0, 4, seq_len), np.int32))
  return packing.as_dict(np.concatenate(rows))


def num_rows(examples) -> int:
  """Rows of `examples`: a dict of arrays with a leading row axis, or an object
  with len() and take(indices) (store.PackedRows, labelled rows)."""
  if hasattr(examples, 'take'):
    return len(examples)
  return len(next(iter(examples.values())))


def take_rows(examples, indices: np.ndarray) -> dict:
  if hasattr(examples, 'take'):
    return examples.take(indices)
  return {k: np.asarray(v[indices]) for k, v in examples.items()}


def _local_rows(global_batch: int, process_index: int, process_count: int) -> slice:
  if global_batch % process_count:
    raise ValueError(
      f'global batch {global_batch} does not divide evenly over {process_count} processes'
    )
  per_process = global_batch // process_count
  return slice(process_index * per_process, (process_index + 1) * per_process)


def windows_per_epoch(num_tokens: int, seq_len: int) -> int:
  # Room for a random offset in [0, seq_len) and the one-token target shift.
  return max(0, (num_tokens - 1 - seq_len) // seq_len)


def steps_per_epoch(
  stream: TokenStream, seq_len: int, global_batch: int, layout: str = 'windows'
) -> int:
  """Training steps in one pass over the split (0 = less than one batch)."""
  check_layout(layout)
  if layout == 'windows':
    return windows_per_epoch(len(stream.tokens), seq_len) // global_batch
  if layout == 'packed':
    return num_rows(stream.packed(seq_len)) // global_batch
  return (len(stream.tokens) - 1) // global_batch // seq_len


def require_steps_per_epoch(
  stream: TokenStream, seq_len: int, global_batch: int, layout: str = 'windows'
) -> int:
  """`steps_per_epoch`, or a CorpusError saying how much data one batch needs."""
  per_epoch = steps_per_epoch(stream, seq_len, global_batch, layout)
  if per_epoch == 0:
    raise _too_small(stream, seq_len, global_batch, layout)
  return per_epoch


def check_layout(layout: str) -> None:
  if layout not in LAYOUTS:
    raise ValueError(f'data.layout must be one of {", ".join(LAYOUTS)}; got {layout!r}')


def _too_small(stream: TokenStream, seq_len: int, global_batch: int, layout: str):
  if layout == 'packed':
    rows = num_rows(stream.packed(seq_len))
    return corpora.CorpusError(
      f'the training split has {len(stream.tokens)} tokens in {stream.num_documents} '
      f'documents, which pack into {rows} rows of {seq_len}; one batch needs {global_batch} rows'
    )
  needed = (global_batch + 1) * seq_len + 1 if layout == 'windows' else global_batch * seq_len + 1
  return corpora.CorpusError(
    f'the training split has {len(stream.tokens)} tokens; one batch of {global_batch} x '
    f'{seq_len} needs at least {needed} (layout {layout!r})'
  )


@dataclasses.dataclass(frozen=True)
class Masking:
  """BERT-style masking for the masked-LM objective (Devlin et al. 2019): each
  token is chosen with probability `rate`; a chosen token becomes [MASK]
  (`mask_fraction` of the time), a random token (`random_fraction`) or stays,
  and is the only kind of position with a loss. The draws are a function of
  (seed, step) over the global batch, so they are deterministic, resume
  exactly and do not depend on the number of processes."""

  mask_id: int
  vocab_size: int  # random replacements are drawn from [0, vocab_size)
  rate: float = 0.15
  mask_fraction: float = 0.8
  random_fraction: float = 0.1

  @classmethod
  def from_config(cls, mlm_config, mask_id: int, vocab_size: int) -> 'Masking':
    fractions = (mlm_config.mask_fraction, mlm_config.random_fraction)
    if not 0 < mlm_config.mask_rate <= 1 or min(fractions) < 0 or sum(fractions) > 1:
      raise ValueError(
        f'mlm: need 0 < mask_rate <= 1 and mask_fraction + random_fraction <= 1; '
        f'got {mlm_config.mask_rate}, {fractions[0]}, {fractions[1]}'
      )
    return cls(mask_id, vocab_size, mlm_config.mask_rate, *fractions)

  def apply(self, batch: dict, seed, rows: slice, global_batch: int) -> dict:
    """`batch` (this process' `rows` of the global batch) with its inputs masked:
    targets are the original inputs, weights 1 where a prediction is scored."""
    tokens = tf.convert_to_tensor(batch['inputs'])
    seed = tf.cast(tf.convert_to_tensor(seed), tf.int64)
    shape = [global_batch, tokens.shape[1]]
    draw = tf.random.stateless_uniform([2] + shape, seed=seed)[:, rows.start : rows.stop]
    random_tokens = tf.random.stateless_uniform(
      shape, seed=seed + [0, 1 << 40], minval=0, maxval=self.vocab_size, dtype=tf.int32
    )
    random_tokens = tf.cast(random_tokens[rows.start : rows.stop], tokens.dtype)
    # Real tokens: packed rows mark padding with segment 0, windows with weight 0.
    present = (
      tf.convert_to_tensor(batch['segment_ids'] if 'segment_ids' in batch else batch['weights']) > 0
    )
    chosen = (draw[0] < self.rate) & present
    masked = tf.where(
      chosen & (draw[1] < self.mask_fraction), tf.cast(self.mask_id, tokens.dtype), tokens
    )
    replaced = (
      chosen
      & (draw[1] >= self.mask_fraction)
      & (draw[1] < self.mask_fraction + self.random_fraction)
    )
    return {
      **batch,
      'inputs': tf.where(replaced, random_tokens, masked),
      'targets': tokens,
      'weights': tf.cast(chosen, tf.float32),
    }


def train_batches(
  stream: TokenStream,
  seq_len: int,
  global_batch: int,
  seed: int,
  start_step: int = 0,
  process_index: int = 0,
  process_count: int = 1,
  layout: str = 'windows',
  masking: Masking | None = None,
) -> Iterator[dict]:
  """Infinite training batches from `start_step` on: this process' rows.

  Yields dicts of numpy arrays [rows, seq_len]: inputs, targets (int32) and
  weights (float32); `packed` adds segment_ids and positions, `stream` adds
  reset [rows] (1.0 on the first step of an epoch). With `masking`, inputs are
  masked and the targets are the unmasked inputs (the masked-LM objective).

  Batch k is a function of (seed, k) alone, computed for this process' rows
  only: each epoch visits every window once in the order of a keyed
  permutation computed one index at a time (lmjax.data.index_shuffle), so
  nothing of the size of the corpus is built, and the windows are read from
  the stream (a token store's shards) by random access.
  """
  rows = _local_rows(global_batch, process_index, process_count)
  per_epoch = require_steps_per_epoch(stream, seq_len, global_batch, layout)
  if layout == 'stream':
    if masking is not None:
      raise ValueError("the masked-LM objective reads 'windows' or 'packed' rows, not 'stream'")
    return _prefetched(_stream_batches(stream, seq_len, global_batch, start_step, rows, per_epoch))
  if layout == 'packed':
    return row_batches(
      stream.packed(seq_len), global_batch, seed, start_step, process_index, process_count, masking
    )
  count = windows_per_epoch(len(stream.tokens), seq_len)

  def batch_of_step(step):
    epochs, order = _epoch_order(seed, step, global_batch, count, rows)
    starts = order * seq_len + _epoch_offset(seed, epochs, seq_len)
    window = _windows(stream.tokens, starts, seq_len + 1)
    return {
      'inputs': window[:, :-1],
      'targets': window[:, 1:],
      'weights': np.ones([len(starts), seq_len], np.float32),
    }

  return _batches(batch_of_step, seed, start_step, rows, global_batch, masking)


def _epoch_order(seed: int, step: int, global_batch: int, count: int, rows: slice):
  """(epoch, example) of this process' rows of batch `step`: examples flow epoch
  after epoch, each epoch in its own keyed order over [0, count)."""
  position = step * global_batch + np.arange(rows.start, rows.stop, dtype=np.int64)
  epochs, within = np.divmod(position, count)
  order = np.empty_like(within)
  for epoch in np.unique(epochs):
    chosen = epochs == epoch
    order[chosen] = index_shuffle.permute(within[chosen], count, (seed, int(epoch)))
  return epochs, order


def _epoch_offset(seed: int, epochs: np.ndarray, seq_len: int) -> np.ndarray:
  """Each epoch's offset in [0, seq_len) of its window grid (one hash per epoch
  in the batch, not per row: a batch spans one epoch, or two)."""
  distinct, index = np.unique(epochs, return_inverse=True)
  keys = [index_shuffle.round_keys((seed, int(epoch), 1))[0] for epoch in distinct]
  return (np.asarray(keys, np.uint64) % np.uint64(seq_len)).astype(np.int64)[index]


def _windows(tokens, starts: np.ndarray, length: int) -> np.ndarray:
  """[len(starts), length] int32 windows of an in-memory or stored stream."""
  if isinstance(tokens, np.ndarray):
    return tokens[starts[:, None] + np.arange(length)].astype(np.int32)
  return tokens.windows(starts, length)


def _batches(batch_of_step, seed, start_step, rows, global_batch, masking) -> Iterator[dict]:
  """batch_of_step(k) for k = start_step, ..., masked when asked, made ahead of
  the consumer on a background thread."""

  def generate():
    step = start_step
    while True:
      batch = batch_of_step(step)
      if masking is not None:
        masked = masking.apply(batch, [seed, step], rows, global_batch)
        batch = {k: np.asarray(v) for k, v in masked.items()}
      yield batch
      step += 1

  return _prefetched(generate())


def _prefetched(batches: Iterator[dict], depth: int = 4) -> Iterator[dict]:
  """`batches`, produced up to `depth` ahead on a daemon thread (numpy and the
  reads release the GIL for the copies that dominate)."""
  ready = queue.Queue(maxsize=depth)

  def produce():
    try:
      for batch in batches:
        ready.put(batch)
    except BaseException as error:  # handed to the consumer, raised there
      ready.put(_Failure(error))

  threading.Thread(target=produce, daemon=True, name='lmjax-batches').start()
  while True:
    batch = ready.get()
    if isinstance(batch, _Failure):
      raise batch.error
    yield batch


@dataclasses.dataclass
class _Failure:
  error: BaseException


def row_batches(
  examples: dict,
  global_batch: int,
  seed: int,
  start_step: int = 0,
  process_index: int = 0,
  process_count: int = 1,
  masking: Masking | None = None,
) -> Iterator[dict]:
  """Infinite batches of whole rows of `examples` (arrays with a leading example
  axis: packed rows, labelled texts), shuffled per epoch, from `start_step` on."""
  rows = _local_rows(global_batch, process_index, process_count)
  count = num_rows(examples)
  if count < global_batch:
    raise corpora.CorpusError(
      f'the training split has {count} examples; one batch needs {global_batch}'
    )

  def batch_of_step(step):
    _, order = _epoch_order(seed, step, global_batch, count, rows)
    return take_rows(examples, order)

  return _batches(batch_of_step, seed, start_step, rows, global_batch, masking)


def _stream_batches(stream, seq_len, global_batch, start_step, rows, per_epoch):
  row_len = (len(stream.tokens) - 1) // global_batch
  row_starts = np.arange(rows.start, rows.stop, dtype=np.int64) * row_len
  step = start_step
  while True:
    position = step % per_epoch
    window = _windows(stream.tokens, row_starts + position * seq_len, seq_len + 1)
    yield {
      'inputs': window[:, :-1],
      'targets': window[:, 1:],
      'weights': np.ones([len(row_starts), seq_len], np.float32),
      'reset': np.full([len(row_starts)], float(position == 0), np.float32),
    }
    step += 1


def eval_batches(
  stream: TokenStream,
  seq_len: int,
  global_batch: int,
  max_batches: int = -1,
  process_index: int = 0,
  process_count: int = 1,
  layout: str = 'windows',
  masking: Masking | None = None,
  seed: int = 0,
) -> Iterator[dict]:
  """Every target token of the split exactly once; padding weighs 0.

  `windows` and `stream`: the stream is cut into `global_batch` contiguous
  rows (the same seq_len windows either way, so their metrics agree), and
  batch i holds window i of every row, so a recurrent model can carry its
  state across batches; `reset` is 1.0 on the first batch. `max_batches`
  keeps the first windows of every row. `packed`: the packed rows in order.
  With `masking`, batch i is masked with the draws of (seed, -1 - i), the same
  in every evaluation.
  """
  check_layout(layout)
  rows = _local_rows(global_batch, process_index, process_count)
  if layout == 'packed':
    batches = eval_row_batches(
      stream.packed(seq_len), global_batch, max_batches, process_index, process_count
    )
  else:
    batches = _eval_windows(stream, seq_len, global_batch, max_batches, rows)
  for i, batch in enumerate(batches):
    if masking is not None:
      batch = {
        k: np.asarray(v)
        for k, v in masking.apply(batch, [seed, -1 - i], rows, global_batch).items()
      }
    yield batch


def eval_row_batches(
  examples: dict,
  global_batch: int,
  max_batches: int = -1,
  process_index: int = 0,
  process_count: int = 1,
) -> Iterator[dict]:
  """Whole rows of `examples` in order, the last batch padded with weight-0 rows."""
  rows = _local_rows(global_batch, process_index, process_count)
  count = num_rows(examples)
  num_batches = -(-count // global_batch)
  if max_batches >= 0:
    num_batches = min(num_batches, max_batches)
  for i in range(num_batches):
    indices = i * global_batch + np.arange(rows.start, rows.stop, dtype=np.int64)
    batch = take_rows(examples, indices[indices < count])
    padding = len(indices) - int((indices < count).sum())  # past the end: zeros
    yield {
      name: np.concatenate([value, np.zeros((padding,) + value.shape[1:], value.dtype)])
      for name, value in batch.items()
    }


def _eval_windows(
  stream: TokenStream, seq_len: int, global_batch: int, max_batches: int, rows: slice
) -> Iterator[dict]:
  """The stream cut into `global_batch` rows of windows_per_row windows (padded
  past its end with weight 0), read a batch at a time."""
  tokens = stream.tokens
  num_tokens = len(tokens)
  num_windows = -(-(num_tokens - 1) // seq_len)
  windows_per_row = -(-num_windows // global_batch)
  row_len = windows_per_row * seq_len
  row_starts = np.arange(rows.start, rows.stop, dtype=np.int64) * row_len
  num_batches = windows_per_row if max_batches < 0 else min(windows_per_row, max_batches)
  for i in range(num_batches):
    starts = row_starts + i * seq_len
    window = np.zeros([len(starts), seq_len + 1], np.int32)
    for r, start in enumerate(starts.tolist()):  # a batch's rows, each one read
      piece = tokens[start : min(start + seq_len + 1, num_tokens)]
      window[r, : len(piece)] = piece
    valid = np.arange(seq_len)[None, :] + starts[:, None] < num_tokens - 1
    yield {
      'inputs': window[:, :-1],
      'targets': window[:, 1:],
      'weights': valid.astype(np.float32),
      'reset': np.full([len(starts)], float(i == 0), np.float32),
    }


def stream_unigram_entropy(stream: TokenStream, vocab_size: int) -> float:
  """`unigram_entropy` of the stream, from the store's counts when it has them."""
  if stream.unigram_counts is not None:
    return _entropy(stream.unigram_counts)
  return unigram_entropy(stream.tokens, vocab_size)


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
  """Entropy (nats/token) of the stream's unigram distribution: a baseline loss."""
  return _entropy(np.bincount(tokens, minlength=vocab_size))


def _entropy(counts: np.ndarray) -> float:
  counts = np.asarray(counts, np.float64)
  probs = counts[counts > 0] / counts.sum()
  return float(-(probs * np.log(probs)).sum())
