"""The token store: a split tokenized once into shards on disk (or gs://), read
by random access, reused by every run that would tokenize it the same way.

Layout: `<data.cache_dir>/<corpus>/<split>-<key>/`
  tokens-SSSSS-of-NNNNN.bin      shard S's tokens, little-endian `manifest['dtype']`
                                 (uint16 when the vocabulary fits, else int32)
  documents-SSSSS-of-NNNNN.bin   int64 offsets of its documents' first tokens, and its end
  shard-SSSSS-of-NNNNN.json      the shard's counts, unigram counts and file checksums,
                                 written once its files are complete
  manifest.json                  written last, once every shard is there (the commit):
                                 what the tokens are (corpus, split, cleaning, documents,
                                 tokenizer fingerprint), their counts, every file's size
                                 and SHA-256

The split's documents are dealt to the shards in blocks of `BLOCK` documents
(block b to shard b mod N, N = data.store_shards), and the stream is shard 0,
then shard 1, ...: the order depends on N alone, not on how many processes or
machines prepared it. With N = 1 the stream is the split in corpus order.

`<key>` hashes everything that changes the tokens (the corpus, and its local
files' names, sizes and modification times; the split, cleaning, document
unit, EOS joining, shard count, the tokenizer's fingerprint, the format), so
a changed input gets a new store and never reuses an old one.

Why fixed-width token files rather than ArrayRecord: a language-model batch is
a slice at an arbitrary token offset, which a flat file serves with one read
(pread locally, a ranged read through tf.io.gfile on gs://) and no
per-record decoding or index; the shard files are plain arrays any tool reads.

Preparation streams the split through the tokenizer one block at a time, so
its memory is bounded by a block, not the split. Each process (or machine)
prepares its share of the shards under a lock, so processes that find the
store missing prepare each shard once; files are written under temporary
names and renamed, a shard's JSON only after its files, the manifest only
after every shard's JSON: an interrupted preparation resumes with the shards
it had not finished and never leaves a store that looks complete.
"""

import hashlib
import json
import os
import re
import time
import uuid

import numpy as np
import tensorflow as tf

from lmjax import fs
from lmjax import locks
from lmjax import storage
from lmjax.data import corpora
from lmjax.data import packing

FORMAT_VERSION = 1
BLOCK = 1024  # documents tokenized per call, and dealt to one shard ...
BLOCK_CHARS = 16 << 20  # ... or fewer, once they hold this many characters
_READ_CHUNK = 16 << 20  # bytes hashed per read when verifying
_OFFSETS_CHUNK = 1 << 20  # document offsets packed per chunk
_POLL_S = 2.0  # how often a process waiting for other processes' shards looks


class StoreError(corpora.CorpusError):
  """A token store that is damaged (missing, truncated or corrupt file)."""


def default_cache_dir(data_config) -> str:
  """data.cache_dir, or `lmjax_tokens` inside the tfds data_dir (on gs:// on TPU)."""
  if data_config.cache_dir:
    return os.path.expanduser(data_config.cache_dir)
  data_dir = data_config.data_dir or os.environ.get('TFDS_DATA_DIR') or '~/tensorflow_datasets'
  return os.path.join(os.path.expanduser(data_dir), 'lmjax_tokens')


def _source_description(data_config, split: str) -> dict:
  """What the split's text is: the corpus, and for local files each file's name,
  size and modification time."""
  source = {
    'name': data_config.name,
    'split': split,
    'text_key': data_config.text_key,
    'data_dir': data_config.data_dir,
  }
  if data_config.name == 'files':
    source['files'] = {}
    for key in ('files', 'validation_files', 'test_files'):
      for path in sorted(corpora.glob_files(data_config[key])) if data_config[key] else []:
        stat = tf.io.gfile.stat(path)
        source['files'][path] = [stat.length, stat.mtime_nsec]
    source['fractions'] = [data_config.validation_fraction, data_config.test_fraction]
  return source


def description(data_config, split: str, tokenizer, label_key: str = '', fields: str = '') -> dict:
  """Everything the tokens depend on (what the key hashes, and the manifest keeps).
  With `label_key`, a labelled store: one document per example, every example
  kept and no EOS appended, and each example's label (the field `label_key`).
  With `fields` ('source,target' for text pairs), a store of examples whose
  texts are those fields, each one a document (every one kept, no EOS), in turn."""
  described = {
    'format_version': FORMAT_VERSION,
    'source': _source_description(data_config, split),
    'clean': data_config.clean.to_dict(),
    'documents': data_config.documents,
    'invalid_utf8': data_config.invalid_utf8,
    'append_eos': data_config.append_eos,
    'num_shards': data_config.store_shards,
    'tokenizer': tokenizer.fingerprint(),
  }
  if label_key:
    described.update(labels=label_key, documents='examples', append_eos=False)
  elif fields:
    described.update(fields=fields, documents='examples', append_eos=False)
  return described


def directory(data_config, split: str, tokenizer, label_key: str = '', fields: str = '') -> str:
  described = description(data_config, split, tokenizer, label_key, fields)
  key = hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]
  corpus = re.sub(r'[^A-Za-z0-9_.-]+', '_', data_config.name)
  kind = 'labelled-' if label_key else 'pairs-' if fields else ''
  return os.path.join(default_cache_dir(data_config), corpus, f'{split}-{kind}{key}')


def shard_name(kind: str, shard: int, num_shards: int, extension: str = 'bin') -> str:
  return f'{kind}-{shard:05d}-of-{num_shards:05d}.{extension}'


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with fs.open(path, 'rb') as f:
    while chunk := f.read(_READ_CHUNK):
      digest.update(chunk)
  return digest.hexdigest()


def _stat(path: str) -> tuple[int, int]:
  """(bytes, modification time in ns): os.stat locally (tf.io.gfile rounds the
  time to whole seconds there), tf.io.gfile on object stores."""
  if '://' not in path:
    stat = os.stat(path)
    return stat.st_size, stat.st_mtime_ns
  stat = tf.io.gfile.stat(path)
  return stat.length, stat.mtime_nsec


def _read_json(path: str) -> dict | None:
  if not fs.exists(path):
    return None
  with fs.open(path) as f:
    return json.loads(f.read())


def _write_json(path: str, record: dict) -> None:
  temporary = f'{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}'
  with fs.open(temporary, 'w') as f:
    f.write(json.dumps(record, indent=1, sort_keys=True) + '\n')
  fs.replace(temporary, path)


def read_manifest(path: str) -> dict | None:
  """The committed manifest of the store at `path`, or None if there is none."""
  return _read_json(os.path.join(path, 'manifest.json'))


def rebuild_hint(path: str) -> str:
  return (
    f'delete {path} and run `python -m lmjax.prepare --config CONFIG` (or start the run '
    'again: it prepares a missing store)'
  )


def verify(path: str, manifest: dict, every_checksum: bool = False) -> None:
  """Raises StoreError naming the file if one is missing, truncated or corrupt.
  A file whose size and modification time are those recorded when it was
  written is trusted (hashing a 4 GB store takes 5 s at every start); one
  that was touched since, or every file with `every_checksum`, is hashed."""
  for name, expected in manifest['files'].items():
    file_path = os.path.join(path, name)
    if not fs.exists(file_path):
      raise StoreError(f'token store file {file_path} is missing; {rebuild_hint(path)}')
    size, mtime = _stat(file_path)
    if size != expected['bytes']:
      raise StoreError(
        f'token store file {file_path} is truncated or overwritten: {size} bytes, the '
        f'manifest says {expected["bytes"]}; {rebuild_hint(path)}'
      )
    touched = mtime != expected.get('mtime_nsec')
    if (every_checksum or touched) and _sha256(file_path) != expected['sha256']:
      raise StoreError(
        f'token store file {file_path} fails its SHA-256 checksum; {rebuild_hint(path)}'
      )


# ----------------------------------------------------------------------------
# Preparation.


class _Writer:
  """Appends arrays to a file under a temporary name; hashes what it writes."""

  def __init__(self, path: str, suffix: str):
    self.path, self.temporary = path, f'{path}.tmp-{suffix}'
    self.file = fs.open(self.temporary, 'wb')
    self.file.write(b'')  # creates the file now: a shard may hold no tokens
    self.digest = hashlib.sha256()
    self.bytes = 0

  def write(self, array: np.ndarray) -> None:
    data = np.ascontiguousarray(array).tobytes()
    self.file.write(data)
    self.digest.update(data)
    self.bytes += len(data)

  def commit(self) -> dict:
    self.file.close()
    fs.replace(self.temporary, self.path)
    mtime = _stat(self.path)[1]  # a later change of it means: hash again
    return {'bytes': self.bytes, 'sha256': self.digest.hexdigest(), 'mtime_nsec': mtime}

  def discard(self) -> None:
    try:
      self.file.close()
    except Exception:  # noqa: BLE001 - a full disk fails the close too; the file goes anyway
      pass
    if fs.exists(self.temporary):
      tf.io.gfile.remove(self.temporary)


def token_dtype(vocab_size: int) -> np.dtype:
  return np.dtype('<u2') if vocab_size <= 1 << 16 else np.dtype('<i4')


class _Shard:
  """One shard being written: its token and document files (and a labelled
  store's labels: per example, an int32 index into the shard's label values)
  and its counts."""

  def __init__(self, path: str, shard: int, num_shards: int, vocab_size: int, labelled=False):
    suffix = f'{os.getpid()}-{uuid.uuid4().hex[:8]}'
    kinds = ('tokens', 'documents', 'labels') if labelled else ('tokens', 'documents')
    self.names = [shard_name(kind, shard, num_shards) for kind in kinds]
    self.json_path = os.path.join(path, shard_name('shard', shard, num_shards, 'json'))
    self.writers = [_Writer(os.path.join(path, n), suffix) for n in self.names]
    self.tokens, self.documents = self.writers[:2]
    self.documents.write(np.zeros(1, '<i8'))
    self.dtype = token_dtype(vocab_size)
    self.unigrams = np.zeros(vocab_size, np.int64)
    self.counts = {'tokens': 0, 'documents': 0, 'bytes': 0}
    self.label_values = {} if labelled else None  # JSON of a label -> its index

  def add(self, pieces: list, num_bytes: int, labels=None) -> None:
    lengths = np.array([len(piece) for piece in pieces], np.int64)
    if lengths.sum():
      tokens = np.concatenate(pieces)
      self.tokens.write(tokens.astype(self.dtype))
      self.unigrams += np.bincount(tokens, minlength=len(self.unigrams))[: len(self.unigrams)]
    self.documents.write(self.counts['tokens'] + np.cumsum(lengths).astype('<i8'))
    if self.label_values is not None:
      keys = [json.dumps(label) for label in labels]
      index = [self.label_values.setdefault(key, len(self.label_values)) for key in keys]
      self.writers[2].write(np.asarray(index, '<i4'))
    self.counts['tokens'] += int(lengths.sum())
    self.counts['documents'] += len(pieces)
    self.counts['bytes'] += num_bytes

  def commit(self) -> None:
    files = {name: writer.commit() for name, writer in zip(self.names, self.writers)}
    record = {**self.counts, 'files': files, 'unigrams': self.unigrams.tolist()}
    if self.label_values is not None:
      record['label_values'] = [json.loads(key) for key in self.label_values]
    _write_json(self.json_path, record)

  def discard(self) -> None:
    for writer in self.writers:
      writer.discard()


def prepare_shards(path, shards, num_shards, texts, tokenizer, append_eos, log, labelled=False):
  """One pass over `texts` (the split's cleaned documents, or (text, label)
  examples when `labelled`) writing `shards`."""
  vocab_size = tokenizer.vocab_size
  writing = {s: _Shard(path, s, num_shards, vocab_size, labelled) for s in shards}
  eos = np.array([tokenizer.eos_id] if append_eos else [], np.int32)
  started, tokens_done, block, batch, chars = time.perf_counter(), 0, 0, [], 0

  def flush():
    nonlocal tokens_done, chars
    shard = writing.get(block % num_shards)
    if shard is not None and batch:
      strings = [item[0] for item in batch] if labelled else batch
      pieces = [
        np.concatenate([np.asarray(ids, np.int32), eos]) for ids in tokenizer.encode_batch(strings)
      ]
      labels = [item[1] for item in batch] if labelled else None
      shard.add(pieces, sum(len(text.encode('utf-8')) for text in strings), labels)
      tokens_done += sum(len(piece) for piece in pieces)
    batch.clear()
    chars = 0

  try:
    for item in texts:
      batch.append(item)
      chars += len(item[0] if labelled else item)
      if len(batch) == BLOCK or chars >= BLOCK_CHARS:
        flush()
        block += 1
        if block % 200 == 0:
          rate = tokens_done / max(time.perf_counter() - started, 1e-9)
          log(
            f'  token store: {block * BLOCK:,} documents read, {tokens_done:,} tokens '
            f'written ({rate:,.0f} tokens/s)'
          )
    flush()
    for shard in writing.values():
      shard.commit()
  except BaseException as error:  # an interrupt too: no temporary file is left
    for shard in writing.values():
      shard.discard()
    _raise_if_disk_full(error, path)
    raise


def _raise_if_disk_full(error: BaseException, path: str) -> None:
  if isinstance(error, Exception) and storage.is_disk_full(error):
    raise StoreError(
      f'the disk is full while preparing the token store {path}; nothing half-written '
      'is kept. Free space, or set data.cache_dir to a larger disk, and start again.'
    ) from None


def _shard_records(path: str, kind: str, num_shards: int) -> list[dict] | None:
  """Every shard's `kind` JSON record, or None while one is still missing."""
  records = []
  for shard in range(num_shards):
    record = _read_json(os.path.join(path, shard_name(kind, shard, num_shards, 'json')))
    if record is None:
      return None
    records.append(record)
  return records


def commit(path: str, described: dict, num_shards: int) -> dict | None:
  """The manifest, written once every shard's JSON is there (None before that)."""
  records = _shard_records(path, 'shard', num_shards)
  if records is None:
    return None
  manifest = {
    **described,
    'tokens': sum(r['tokens'] for r in records),
    'documents': sum(r['documents'] for r in records),
    'bytes': sum(r['bytes'] for r in records),
    'shard_tokens': [r['tokens'] for r in records],
    'shard_documents': [r['documents'] for r in records],
    'unigrams': np.sum([r['unigrams'] for r in records], axis=0).tolist(),
    'files': {name: meta for r in records for name, meta in r['files'].items()},
  }
  if 'label_values' in records[0]:
    manifest['shard_label_values'] = [r['label_values'] for r in records]
  manifest['dtype'] = token_dtype(len(manifest['unigrams'])).str
  if read_manifest(path) is None:  # identical content whoever commits
    _write_json(os.path.join(path, 'manifest.json'), manifest)
  return read_manifest(path)


def ensure(
  data_config,
  split: str,
  tokenizer,
  texts,
  share: tuple[int, int] = (0, 1),
  log=print,
  label_key: str = '',
  fields: str = '',
) -> tuple[str, dict, bool]:
  """(path, manifest, whether this call prepared shards). Prepares this share's
  missing shards (share (i, n): the shards s with s mod n = i), then waits for
  the others' (other processes of the run, or other machines) and commits. An
  existing store is reused once its files' sizes and checksums match.
  `texts()` yields the split's documents, or with `label_key` its (text,
  label) examples (a labelled store, read by `Examples`), or with `fields`
  each example's field texts in turn (a store of examples, read by `Examples`)."""
  path = directory(data_config, split, tokenizer, label_key, fields)
  manifest = read_manifest(path)
  if manifest is not None:
    verify(path, manifest)
    return path, manifest, False
  described = description(data_config, split, tokenizer, label_key, fields)
  num_shards = described['num_shards']

  def prepare(todo):
    log(f'token store: preparing split {split!r} into {path} (shards {todo} of {num_shards})')
    append_eos = described['append_eos']
    labelled = bool(label_key)
    prepare_shards(path, todo, num_shards, texts(), tokenizer, append_eos, log, labelled)

  committed = lambda: commit(path, described, num_shards)
  manifest, prepared = _prepare_share(
    path, 'prepare', num_shards, 'shard', share, prepare, committed, log
  )
  if manifest['documents'] == 0:
    what = 'examples' if label_key or fields else 'text'
    raise corpora.CorpusError(f'split {split!r} of corpus {data_config.name!r} has no {what}')
  return path, manifest, prepared


def _prepare_share(path, what, num_shards, record_kind, share, prepare, commit_fn, log):
  """(manifest, whether this call prepared shards): under this share's lock,
  `prepare(todo)` writes the share's shards that have no `record_kind` JSON
  yet; then `commit_fn()` is polled until every share's shards are there."""
  index, count = share
  fs.makedirs(path)
  mine = range(index, num_shards, count)
  with locks.Lock(path, f'.{what}-{index}-of-{count}.lock', f'preparing {path}', wait=True):
    todo = [
      s
      for s in mine
      if not fs.exists(os.path.join(path, shard_name(record_kind, s, num_shards, 'json')))
    ]
    if todo:
      prepare(todo)
  told = False
  while (manifest := commit_fn()) is None:
    if not told:
      log(f"token store: waiting for the other processes' shards of {path}")
      told = True
    time.sleep(_POLL_S)
  return manifest, bool(todo)


# ----------------------------------------------------------------------------
# Packed rows (data.layout='packed'), one view per seq_len inside the store.


def packed_directory(path: str, seq_len: int) -> str:
  return os.path.join(path, f'packed-{seq_len}')


def ensure_packed(
  path: str, manifest: dict, seq_len: int, eos_id: int, share=(0, 1), log=print
) -> tuple[str, dict, bool]:
  """(path, manifest, whether this call packed shards) of the store's documents
  packed into rows of `seq_len` (lmjax.data.packing): each token shard packed
  into its own rows shard, by the process whose share it is, then committed
  as the store's tokens are."""
  packed = packed_directory(path, seq_len)
  packed_manifest = read_manifest(packed)
  if packed_manifest is not None:
    verify(packed, packed_manifest)
    return packed, packed_manifest, False
  num_shards = manifest['num_shards']
  dtype = token_dtype(len(manifest['unigrams']) + 2)

  def prepare(todo):
    log(f'token store: packing rows of {seq_len} into {packed} (shards {todo} of {num_shards})')
    for shard in todo:
      _pack_shard(path, manifest, shard, seq_len, eos_id, packed, dtype)

  def commit_fn():
    records = _shard_records(packed, 'rows', num_shards)
    if records is None:
      return None
    if read_manifest(packed) is None:
      record = {
        'format_version': FORMAT_VERSION,
        'seq_len': seq_len,
        'dtype': dtype.str,
        'num_shards': num_shards,
        'shard_rows': [r['rows'] for r in records],
        'rows': sum(r['rows'] for r in records),
        'files': {name: meta for r in records for name, meta in r['files'].items()},
      }
      _write_json(os.path.join(packed, 'manifest.json'), record)
    return read_manifest(packed)

  packed_manifest, prepared = _prepare_share(
    packed, 'pack', num_shards, 'rows', share, prepare, commit_fn, log
  )
  return packed, packed_manifest, prepared


def _pack_shard(path, manifest, shard, seq_len, eos_id, packed, dtype) -> None:
  num_shards = manifest['num_shards']
  tokens = _Records(
    [os.path.join(path, shard_name('tokens', shard, num_shards))],
    [manifest['shard_tokens'][shard]],
    np.dtype(manifest['dtype']),
  )
  offsets = _Records(
    [os.path.join(path, shard_name('documents', shard, num_shards))],
    [manifest['shard_documents'][shard] + 1],
    np.dtype('<i8'),
  )
  name = shard_name('rows', shard, num_shards)
  writer = _Writer(os.path.join(packed, name), f'{os.getpid()}-{uuid.uuid4().hex[:8]}')
  rows = 0

  def emit(block):
    nonlocal rows
    writer.write(packing.encode(block).astype(dtype))
    rows += len(block)

  step = _OFFSETS_CHUNK
  chunks = (offsets.read(i, i + step + 1) for i in range(0, max(len(offsets) - 1, 1), step))
  try:
    packing.pack_documents(chunks, tokens.read, seq_len, eos_id, emit)
    files = {name: writer.commit()}
  except BaseException as error:
    writer.discard()
    _raise_if_disk_full(error, packed)
    raise
  record = {'rows': rows, 'files': files}
  _write_json(os.path.join(packed, shard_name('rows', shard, num_shards, 'json')), record)


# ----------------------------------------------------------------------------
# Reading.


class _Records:
  """Fixed-width records (`width` values of `dtype` each) over shard files, read
  on demand: pread locally, ranged reads through tf.io.gfile on gs://."""

  def __init__(self, files: list, counts: list, dtype, width: int = 1):
    self.files, self.dtype, self.width = files, np.dtype(dtype), width
    self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    self.remote = any('://' in f for f in files)
    self._files = {}

  def __len__(self) -> int:
    return int(self.starts[-1])

  def _shard(self, s: int):
    if s not in self._files:
      if self.remote:
        self._files[s] = fs.open(self.files[s], 'rb')
      else:  # a descriptor, closed when the process ends
        self._files[s] = os.open(self.files[s], os.O_RDONLY)
    return self._files[s]

  def _read(self, s: int, start: int, stop: int) -> np.ndarray:
    # Local shards are read with pread, not memory-mapped: a mapped page of a
    # file in the page cache counts in the process' RSS (a 2 MB folio per
    # random window on this kernel: +0.6 GB over 20 steps of a 2 GB corpus),
    # while pread copies the window and leaves RSS flat.
    shard, size = self._shard(s), self.dtype.itemsize * self.width
    if not self.remote:
      data = os.pread(shard, (stop - start) * size, start * size)
    else:
      shard.seek(start * size)
      data = shard.read((stop - start) * size)
    if len(data) != (stop - start) * size:
      raise StoreError(
        f'token store file {self.files[s]} is shorter than its manifest says; '
        f'{rebuild_hint(os.path.dirname(self.files[s]))}'
      )
    return np.frombuffer(data, self.dtype)

  def read(self, start: int, stop: int) -> np.ndarray:
    """Records [start, stop), across shard boundaries, flat (width values each)."""
    start, stop = max(0, int(start)), min(len(self), int(stop))
    if stop <= start:
      return np.zeros(0, self.dtype)
    s = int(np.searchsorted(self.starts, start, 'right')) - 1
    pieces = []
    while start < stop:
      end = min(stop, int(self.starts[s + 1]))
      pieces.append(self._read(s, start - int(self.starts[s]), end - int(self.starts[s])))
      start, s = end, s + 1
    return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


class Tokens(_Records):
  """A split's tokens as one read-only int32 array over its shards, read on
  demand. Supports len(), slicing, integer-array indexing and `windows`."""

  def __init__(self, path: str, manifest: dict):
    num_shards = manifest['num_shards']
    files = [os.path.join(path, shard_name('tokens', s, num_shards)) for s in range(num_shards)]
    super().__init__(files, manifest['shard_tokens'], manifest['dtype'])

  @property
  def shape(self) -> tuple:
    return (len(self),)

  def read(self, start: int, stop: int) -> np.ndarray:
    """Tokens [start, stop) as int32, across shard boundaries."""
    return super().read(start, stop).astype(np.int32)

  def windows(self, starts, length: int) -> np.ndarray:
    """[len(starts), length] int32: the tokens at starts[i] .. starts[i] + length."""
    return np.stack([self.read(int(s), int(s) + length) for s in np.asarray(starts)])

  def __getitem__(self, key):
    if isinstance(key, slice):
      start, stop, step = key.indices(len(self))
      if step == 1:
        return self.read(start, stop)
      return np.asarray(self)[key]  # strided: rare, read whole
    indices = np.asarray(key)
    if indices.ndim == 0:
      return self.read(int(indices), int(indices) + 1)[0]
    if indices.size > 4096:  # many scattered reads cost more than one whole read
      return np.asarray(self)[indices]
    return np.array(
      [self.read(int(i), int(i) + 1)[0] for i in indices.reshape(-1)], np.int32
    ).reshape(indices.shape)

  def __array__(self, dtype=None, copy=None):
    whole = self.read(0, len(self))
    return whole if dtype is None else whole.astype(dtype)


class PackedRows:
  """A store's rows packed to one seq_len (`ensure_packed`): len(), take(indices)
  -> the batch arrays (lmjax.data.packing.decode), one read per row; [name]
  reads a whole plane (for inspection and tests)."""

  def __init__(self, path: str, manifest: dict):
    self.seq_len, num_shards = manifest['seq_len'], manifest['num_shards']
    files = [os.path.join(path, shard_name('rows', s, num_shards)) for s in range(num_shards)]
    self.records = _Records(files, manifest['shard_rows'], manifest['dtype'], 2 * self.seq_len)

  def __len__(self) -> int:
    return len(self.records)

  def take(self, indices) -> dict:
    reads = [self.records.read(i, i + 1) for i in np.asarray(indices, np.int64).reshape(-1)]
    stored = np.stack(reads) if reads else np.zeros((0, 2 * self.seq_len), self.records.dtype)
    return packing.decode(stored.reshape(-1, 2, self.seq_len))

  def __getitem__(self, name: str) -> np.ndarray:
    return self.take(np.arange(len(self)))[name]


def document_offsets(path: str, manifest: dict) -> np.ndarray:
  """[documents + 1] int64 offsets of every document in the stream."""
  num_shards = manifest['num_shards']
  starts = np.concatenate([[0], np.cumsum(manifest['shard_tokens'])]).astype(np.int64)
  pieces = []
  for s in range(num_shards):
    with fs.open(os.path.join(path, shard_name('documents', s, num_shards)), 'rb') as f:
      offsets = np.frombuffer(f.read(), '<i8')
    pieces.append(offsets[:-1] + starts[s])
  return np.concatenate(pieces + [starts[-1:]]).astype(np.int64)


class Examples:
  """A labelled store's examples (`ensure(..., label_key=...)`): each one's
  tokens read on demand, and the labels of all of them."""

  def __init__(self, path: str, manifest: dict):
    self.path, self.manifest = path, manifest
    self.tokens = Tokens(path, manifest)
    num_shards = manifest['num_shards']
    self.offsets = [
      _Records([os.path.join(path, shard_name('documents', s, num_shards))], [count + 1], '<i8')
      for s, count in enumerate(manifest['shard_documents'])
    ]
    self.first = np.concatenate([[0], np.cumsum(manifest['shard_documents'])]).astype(np.int64)

  def __len__(self) -> int:
    return int(self.first[-1])

  def tokens_of(self, index: int, limit: int) -> np.ndarray:
    """Example `index`'s first `limit` tokens (int32)."""
    s = int(np.searchsorted(self.first, index, 'right')) - 1
    local = index - int(self.first[s])
    start, end = self.offsets[s].read(local, local + 2) + self.tokens.starts[s]
    return self.tokens.read(start, min(end, start + limit))

  def labels(self) -> list[tuple[list, np.ndarray]]:
    """Per shard: (its distinct label values, each example's index into them)."""
    num_shards = self.manifest['num_shards']
    result = []
    for s, values in enumerate(self.manifest['shard_label_values']):
      with fs.open(os.path.join(self.path, shard_name('labels', s, num_shards)), 'rb') as f:
        result.append((values, np.frombuffer(f.read(), '<i4')))
    return result
