"""Packed rows: packed once with the token store and stored, equal to packing in
memory, read row by row, resumable bitwise, packed in bounded memory, and
prepared by two machines (`lmjax.prepare --num_shards 2`) as by one."""

import itertools
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from conftest import tiny_config
from lmjax.data import packing
from lmjax.data import pipeline
from lmjax.data import store
from lmjax.data import tokenizers


def quiet(message):
  del message


def data_config(corpus_dir, tmp_path, **overrides):
  overrides = {
    'data.cache_dir': str(tmp_path / 'stores'),
    'data.documents': 'lines',
    'data.layout': 'packed',
    **overrides,
  }
  return tiny_config(corpus_dir, **overrides).data


def take(batches, n):
  return list(itertools.islice(batches, n))


def test_stored_rows_are_the_in_memory_packing_and_batches_resume_bitwise(corpus_dir, tmp_path):
  data = data_config(corpus_dir, tmp_path, **{'data.store_shards': 1})
  tokenizer = tokenizers.ByteTokenizer()
  stored = pipeline.stored_split(data, tokenizer, 'train', quiet, packed_len=32)
  rows = stored.packed(32)
  assert isinstance(rows, store.PackedRows)  # read from the store, not packed again
  packed_dir = store.packed_directory(store.directory(data, 'train', tokenizer), 32)
  assert store.read_manifest(packed_dir)['rows'] == len(rows)
  expected = pipeline.pack(pipeline.tokenize_split(data, tokenizer, 'train'), 32)
  assert len(rows) == len(expected['inputs']) > 100
  for name, value in expected.items():
    np.testing.assert_array_equal(rows[name], value, err_msg=name)
  in_memory = pipeline.TokenStream(
    tokens=np.asarray(stored.tokens),
    num_documents=stored.num_documents,
    num_bytes=stored.num_bytes,
    doc_starts=stored.document_offsets(),
    eos_id=stored.eos_id,
  )
  batches = lambda stream, start, **kw: pipeline.train_batches(
    stream, 32, 8, seed=3, start_step=start, layout='packed', **kw
  )
  whole = take(batches(stored, 0), 24)
  for a, b in zip(whole, take(batches(in_memory, 0), 24)):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  for k in (1, 23):
    for a, b in zip(whole[k:], take(batches(stored, k), 24 - k)):
      for key in a:
        np.testing.assert_array_equal(a[key], b[key])
  halves = [take(batches(stored, 5, process_index=p, process_count=2), 1)[0] for p in range(2)]
  for key in whole[5]:
    np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), whole[5][key])
  evaluated = list(pipeline.eval_batches(stored, 32, 8, layout='packed'))
  assert sum(b['weights'].sum() for b in evaluated) == len(stored.tokens)


def test_rows_of_several_shards_hold_every_piece_of_every_document_once(corpus_dir, tmp_path):
  data = data_config(corpus_dir, tmp_path, **{'data.store_shards': 3})
  stored = pipeline.stored_split(data, tokenizers.ByteTokenizer(), 'train', quiet, packed_len=32)
  rows = stored.packed(32)
  tokens, offsets = np.asarray(stored.tokens), stored.document_offsets()
  expected = sorted(
    tokens[start:end][i : i + 32].tobytes()
    for start, end in itertools.pairwise(offsets)
    for i in range(0, end - start, 32)
  )
  targets, segments = rows['targets'], rows['segment_ids']
  found = sorted(
    targets[r][segments[r] == s].astype(np.int32).tobytes()
    for r in range(len(targets))
    for s in set(segments[r].tolist()) - {0}
  )
  assert found == expected
  assert rows['weights'].mean() > 0.95  # first fit leaves little padding


def test_packing_holds_a_bounded_number_of_rows_whatever_the_corpus(monkeypatch):
  """A short document keeps its row open while long ones fill rows behind it:
  past PENDING_ROWS rows held, the oldest open row is closed and rows flow out."""
  monkeypatch.setattr(packing, 'PENDING_ROWS', 8)
  seq_len, rng = 16, np.random.default_rng(0)
  lengths = [3] + [16] * 200 + [5] * 50
  tokens = np.concatenate([np.append(rng.integers(1, 50, n - 1), 0) for n in lengths])
  offsets = np.concatenate([[0], np.cumsum(lengths)])
  emitted, held = [], []

  def emit(rows):
    emitted.append(rows)
    held.append(len(packer.pending))

  packer = packing.Packer(seq_len, 0, emit)
  # Fed a few documents at a time, as the store feeds chunks of a shard.
  for a, b in itertools.pairwise(range(0, len(lengths) + 1, 10)):
    packer.add(lambda lo, hi: tokens[lo:hi], *packing.pieces(offsets[a : b + 1], seq_len))
  packer.add(lambda lo, hi: tokens[lo:hi], *packing.pieces(offsets[250:], seq_len))
  before_finish = sum(len(r) for r in emitted)
  packer.finish()
  assert before_finish > 150 and max(held) <= 8 + 10  # rows flowed out while packing
  rows = packing.as_dict(np.concatenate(emitted))
  assert rows['weights'].sum() == len(tokens)
  np.testing.assert_array_equal(np.sort(rows['targets'][rows['weights'] > 0]), np.sort(tokens))


def test_stored_encoding_round_trips_packed_rows():
  lengths = np.random.default_rng(2).integers(1, 40, 300)
  tokens = np.random.default_rng(3).integers(0, 300, int(lengths.sum()))
  stream = pipeline.TokenStream(
    tokens=tokens.astype(np.int32),
    num_documents=len(lengths),
    num_bytes=0,
    doc_starts=np.concatenate([[0], np.cumsum(lengths)]),
    eos_id=299,
  )
  rows = pipeline.pack(stream, 16)
  planes = np.stack([rows[name] for name in packing.PLANES], axis=1)
  decoded = packing.decode(packing.encode(planes))
  for name, value in rows.items():
    np.testing.assert_array_equal(decoded[name], value, err_msg=name)


def test_a_damaged_rows_shard_is_named_with_how_to_rebuild_it(corpus_dir, tmp_path):
  data = data_config(corpus_dir, tmp_path)
  tokenizer = tokenizers.ByteTokenizer()
  pipeline.stored_split(data, tokenizer, 'validation', quiet, packed_len=32)
  path = store.directory(data, 'validation', tokenizer)
  victim = os.path.join(store.packed_directory(path, 32), store.shard_name('rows', 1, 4))
  os.truncate(victim, os.path.getsize(victim) - 64)
  with pytest.raises(store.StoreError) as raised:
    pipeline.stored_split(data, tokenizer, 'validation', quiet, packed_len=32)
  assert f'token store file {victim} is truncated' in str(raised.value)
  assert 'python -m lmjax.prepare' in str(raised.value)


@pytest.mark.slow
def test_two_machines_prepare_and_pack_the_store_that_one_prepares(corpus_dir, tmp_path):
  def prepare(cache, *flags):
    return subprocess.Popen(
      [
        sys.executable,
        '-m',
        'lmjax.prepare',
        '--config',
        str(REPO / 'configs' / 'default.py'),
        '--config.data.name=files',
        f'--config.data.files={corpus_dir}/part[012].txt',
        f'--config.data.validation_files={corpus_dir}/part3.txt',
        '--config.data.documents=lines',
        '--config.data.layout=packed',
        '--config.data.seq_len=32',
        f'--config.data.cache_dir={cache}',
        f'--workdir={tmp_path / "run"}',
        '--splits=train',
        *flags,
      ],
      cwd=REPO,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )

  machines = [prepare(tmp_path / 'two', '--num_shards=2', f'--shard_index={i}') for i in (0, 1)]
  for process in machines:
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-2000:]
    assert 'packing rows of 32' in err
  single = prepare(tmp_path / 'one')
  out, err = single.communicate(timeout=300)
  assert single.returncode == 0, err[-2000:]
  stores = [next((tmp_path / name / 'files').glob('train-*')) for name in ('two', 'one')]
  packed = [s / 'packed-32' for s in stores]
  assert sorted(p.name for p in packed[0].glob('.pack-*')) == [
    '.pack-0-of-2.lock',
    '.pack-1-of-2.lock',
  ]
  rows = [store.PackedRows(str(s), store.read_manifest(str(s))) for s in packed]
  assert len(rows[0]) == len(rows[1]) > 0
  for name in packing.PLANES:
    np.testing.assert_array_equal(rows[0][name], rows[1][name])
