"""Packing documents into rows of `seq_len` tokens, streaming, in bounded memory.

Document d's targets are its tokens (ending with the end-of-document token
when append_eos); its inputs are the same tokens shifted right behind an
end-of-document token, so its first token is predicted from a fresh start.
A document longer than `seq_len` is cut into `seq_len` pieces; each piece
goes into the oldest of the last `OPEN_ROWS` rows it fits in (first fit), or
starts a new row. Rows are numbered as they are started and emitted in that
order, once closed (full, pushed out of the open rows, or at the end); so
that memory stays bounded whatever the corpus, at most `PENDING_ROWS` rows
wait to be emitted before the oldest open rows are closed early.

A row is four int32 planes [4, seq_len]: targets, inputs, segment_ids (1, 2,
... per row, 0 = padding) and positions (restarting at every piece).

The token store (lmjax.data.store) keeps packed rows as two planes in the
token dtype (`encode` / `decode`): the targets, and a marker per slot (0:
the piece goes on, 1: padding, k + 2: a piece starts here with first input
k), from which the inputs, segment ids and positions follow.
"""

from collections.abc import Callable
from collections.abc import Iterable

import numpy as np

# data.layout: fixed windows, packed documents, or a stateful stream (recurrent models).
LAYOUTS = ('windows', 'packed', 'stream')

OPEN_ROWS = 64  # Rows that packing keeps open for later, shorter documents.
PENDING_ROWS = 2048  # Rows held (open, or closed behind an open one) before emitting.
CHUNK_TOKENS = 1 << 22  # Tokens placed and gathered per call.
PLANES = ('targets', 'inputs', 'segment_ids', 'positions')


def pieces(offsets: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(start, length, starts a document) of the `seq_len` pieces of the
  documents with these [k + 1] offsets (empty documents have none)."""
  offsets = np.asarray(offsets, np.int64)
  lengths = np.diff(offsets)
  starts, lengths = offsets[:-1][lengths > 0], lengths[lengths > 0]
  count = -(-lengths // seq_len)
  doc = np.repeat(np.arange(len(lengths)), count)
  within = np.arange(len(doc)) - (np.cumsum(count) - count)[doc]
  start = starts[doc] + within * seq_len
  length = np.minimum(seq_len, starts[doc] + lengths[doc] - start)
  return start, length, within == 0


class Packer:
  """First-fit packing of pieces fed in stream order; `emit(rows)` receives
  [m, 4, seq_len] int32 rows in row order."""

  def __init__(self, seq_len: int, eos_id: int, emit: Callable[[np.ndarray], None]):
    self.seq_len, self.eos_id, self.emit = seq_len, eos_id, emit
    self.open = []  # [row, used, segments] of rows with room, oldest first
    self.rows = 0  # rows started
    self.emitted = 0  # rows emitted (all rows below are)
    self.pending = {}  # row -> [4, seq_len] contents, not yet emitted
    self.closed = set()  # pending rows that take no more pieces

  def add(self, read: Callable[[int, int], np.ndarray], start, length, first) -> None:
    """Places the pieces (start, length, starts a document); read(lo, hi)
    returns the stream's tokens [lo, hi)."""
    step = max(1, CHUNK_TOKENS // self.seq_len)  # pieces per call
    for i in range(0, len(start), step):
      self._add(read, start[i : i + step], length[i : i + step], first[i : i + step])

  def _add(self, read, start, length, first) -> None:
    if not len(start):
      return
    seq_len = self.seq_len
    row = np.empty(len(length), np.int64)
    col = np.empty(len(length), np.int64)
    segment = np.empty(len(length), np.int32)
    for i, n in enumerate(length.tolist()):  # a loop over ints; the rest is vectorised
      slot = next((r for r in self.open if r[1] + n <= seq_len), None)
      if slot is None:
        slot = [self.rows, 0, 0]
        self.rows += 1
        if n < seq_len:
          self.open.append(slot)
          if len(self.open) > OPEN_ROWS:
            self.closed.add(self.open.pop(0)[0])
        else:
          self.closed.add(slot[0])
      row[i], col[i], segment[i] = slot[0], slot[1], slot[2] + 1
      slot[1] += n
      slot[2] += 1
      if slot[1] == seq_len and slot in self.open:
        self.open.remove(slot)
        self.closed.add(slot[0])
    touched = np.unique(row)
    block = np.zeros((4, len(touched), seq_len), np.int32)
    for j, r in enumerate(touched.tolist()):
      if r in self.pending:
        block[:, j] = self.pending[r]
    total = int(length.sum())
    within = np.arange(total) - np.repeat(np.cumsum(length) - length, length)
    source = np.repeat(start, length) + within
    target = np.repeat(np.searchsorted(touched, row) * seq_len + col, length) + within
    lo = max(int(start.min()) - 1, 0)
    span = np.asarray(read(lo, int((start + length).max())), np.int32)
    doc_start = (within == 0) & np.repeat(first, length)
    planes = block.reshape(4, -1)
    planes[0, target] = span[source - lo]
    planes[1, target] = np.where(doc_start, self.eos_id, span[np.maximum(source - 1, lo) - lo])
    planes[2, target] = np.repeat(segment, length)
    planes[3, target] = within
    for j, r in enumerate(touched.tolist()):
      self.pending[r] = block[:, j].copy()
    self._flush()

  def _flush(self) -> None:
    while len(self.pending) > PENDING_ROWS and self.emitted not in self.closed:
      self.closed.add(self.open.pop(0)[0])  # the oldest open row holds the others back
    ready = []
    while self.emitted in self.closed:
      ready.append(self.pending.pop(self.emitted))
      self.closed.discard(self.emitted)
      self.emitted += 1
    if ready:
      self.emit(np.stack(ready))

  def finish(self) -> None:
    self.closed.update(r[0] for r in self.open)
    self.open.clear()
    self._flush()


def pack_documents(
  offset_chunks: Iterable[np.ndarray], read, seq_len: int, eos_id: int, emit
) -> None:
  """Packs the documents of consecutive [k + 1] offset arrays (each chunk's
  last offset is the next one's first) of a stream read by read(lo, hi)."""
  packer = Packer(seq_len, eos_id, emit)
  for offsets in offset_chunks:
    packer.add(read, *pieces(offsets, seq_len))
  packer.finish()


def as_dict(rows: np.ndarray) -> dict:
  """[m, 4, seq_len] rows -> the batch arrays, with weights (1 on tokens)."""
  result = {name: np.ascontiguousarray(rows[:, i]) for i, name in enumerate(PLANES)}
  result['weights'] = (result['segment_ids'] > 0).astype(np.float32)
  return result


def encode(rows: np.ndarray) -> np.ndarray:
  """[m, 4, seq_len] rows -> [m, 2, seq_len] (targets, marker) int64."""
  targets, inputs, segments, positions = (rows[:, i].astype(np.int64) for i in range(4))
  marker = np.where(segments == 0, 1, np.where(positions == 0, inputs + 2, 0))
  return np.stack([targets, marker], axis=1)


def decode(stored: np.ndarray) -> dict:
  """[m, 2, seq_len] stored rows -> the batch arrays (as `as_dict`)."""
  targets, marker = stored[:, 0].astype(np.int32), stored[:, 1].astype(np.int64)
  starts, padding = marker >= 2, marker == 1
  columns = np.arange(targets.shape[1])
  last_start = np.maximum.accumulate(np.where(starts, columns, 0), axis=1)
  previous = np.concatenate([np.zeros_like(targets[:, :1]), targets[:, :-1]], axis=1)
  inputs = np.where(starts, marker - 2, previous)
  segment_ids = np.cumsum(starts, axis=1)
  keep = ~padding
  return {
    'targets': targets,
    'inputs': (inputs * keep).astype(np.int32),
    'segment_ids': (segment_ids * keep).astype(np.int32),
    'positions': ((columns - last_start) * keep).astype(np.int32),
    'weights': keep.astype(np.float32),
  }
