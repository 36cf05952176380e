"""The token store: prepared once, equal to tokenizing in memory, read by random
access across shards, keyed by everything that changes the tokens, and loud and
safe when damaged, interrupted or prepared by two processes at once."""

import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from conftest import small_tmpfs
from conftest import tiny_config
from lmjax.data import corpora
from lmjax.data import pipeline
from lmjax.data import store
from lmjax.data import tokenizers


def data_config(corpus_dir, tmp_path, **overrides):
  return tiny_config(corpus_dir, **{'data.cache_dir': str(tmp_path / 'stores'), **overrides}).data


def quiet(message):
  del message


def test_a_one_shard_store_is_the_in_memory_stream_token_for_token(corpus_dir, tmp_path):
  data = data_config(corpus_dir, tmp_path, **{'data.store_shards': 1})
  tokenizer = tokenizers.ByteTokenizer()
  expected = pipeline.tokenize_split(data, tokenizer, 'train')
  stored = pipeline.stored_split(data, tokenizer, 'train', quiet)
  np.testing.assert_array_equal(np.asarray(stored.tokens), expected.tokens)
  np.testing.assert_array_equal(stored.document_offsets(), expected.document_offsets())
  assert (stored.num_documents, stored.num_bytes) == (expected.num_documents, expected.num_bytes)
  assert pipeline.stream_unigram_entropy(stored, 257) == pytest.approx(
    pipeline.unigram_entropy(expected.tokens, 257), rel=1e-12
  )


def test_shards_hold_every_document_once_and_windows_cross_their_boundaries(corpus_dir, tmp_path):
  data = data_config(corpus_dir, tmp_path, **{'data.store_shards': 3, 'data.documents': 'lines'})
  tokenizer = tokenizers.ByteTokenizer()
  expected = pipeline.tokenize_split(data, tokenizer, 'train')
  stored = pipeline.stored_split(data, tokenizer, 'train', quiet)
  whole = np.asarray(stored.tokens)
  documents = lambda tokens, offsets: sorted(
    tokens[a:b].tobytes() for a, b in itertools.pairwise(offsets)
  )
  assert documents(whole, stored.document_offsets()) == documents(
    expected.tokens, expected.document_offsets()
  )
  boundaries = stored.tokens.starts[1:-1]
  starts = np.concatenate([boundaries - 5, [0, len(whole) - 9]])
  np.testing.assert_array_equal(
    stored.tokens.windows(starts, 9), whole[starts[:, None] + np.arange(9)]
  )


def test_an_existing_store_is_reused_and_a_changed_input_gets_a_new_one(
  corpus_dir, tmp_path, capsys
):
  data = data_config(corpus_dir, tmp_path)
  tokenizer = tokenizers.ByteTokenizer()
  pipeline.stored_split(data, tokenizer, 'train')
  pipeline.stored_split(data, tokenizer, 'train')
  out = capsys.readouterr().out
  assert out.count("token store prepared for split 'train'") == 1
  assert "token store reused for split 'train': " in out
  first = store.directory(data, 'train', tokenizer)
  assert store.read_manifest(first)['tokenizer'] == tokenizer.fingerprint()
  chars = tokenizers.CharTokenizer.build(['abc'])
  assert store.directory(data, 'train', chars) != first  # another tokenizer
  data.clean.lowercase = True
  assert store.directory(data, 'train', tokenizer) != first  # other cleaning
  data.clean.lowercase = False
  assert store.directory(data, 'train', tokenizer) == first
  copy = tmp_path / 'corpus'
  copy.mkdir()
  for path in corpus_dir.glob('part*.txt'):
    (copy / path.name).write_text(path.read_text())
  data = data_config(copy, tmp_path)
  before = store.directory(data, 'train', tokenizer)
  with open(copy / 'part0.txt', 'a') as f:
    f.write('one more line\n')
  assert store.directory(data, 'train', tokenizer) != before  # a file changed


def damaged(corpus_dir, tmp_path, damage):
  data = data_config(corpus_dir, tmp_path)
  tokenizer = tokenizers.ByteTokenizer()
  pipeline.stored_split(data, tokenizer, 'validation', quiet)
  path = store.directory(data, 'validation', tokenizer)
  victim = os.path.join(path, store.shard_name('tokens', 0, 4))
  damage(victim)
  with pytest.raises(store.StoreError) as raised:
    pipeline.stored_split(data, tokenizer, 'validation', quiet)
  return str(raised.value), victim, path


def test_a_truncated_shard_is_named_with_how_to_rebuild_it(corpus_dir, tmp_path):
  message, victim, path = damaged(
    corpus_dir, tmp_path, lambda p: os.truncate(p, os.path.getsize(p) - 2)
  )
  assert f'token store file {victim} is truncated' in message
  assert f'delete {path} and run `python -m lmjax.prepare' in message


def test_a_corrupt_or_missing_shard_is_named(corpus_dir, tmp_path):
  def flip(path):
    with open(path, 'r+b') as f:
      f.seek(10)
      byte = f.read(1)
      f.seek(10)
      f.write(bytes([byte[0] ^ 0xFF]))

  message, victim, _ = damaged(corpus_dir, tmp_path / 'a', flip)
  assert f'token store file {victim} fails its SHA-256 checksum' in message
  message, victim, _ = damaged(corpus_dir, tmp_path / 'b', os.remove)
  assert f'token store file {victim} is missing' in message


def test_an_interrupted_preparation_never_looks_complete_and_resumes(corpus_dir, tmp_path):
  data = data_config(corpus_dir, tmp_path, **{'data.documents': 'lines'})
  tokenizer = tokenizers.ByteTokenizer()
  path = store.directory(data, 'train', tokenizer)

  def interrupted():
    for i, text in enumerate(pipeline.texts(data, 'train')):
      if i == 3 * store.BLOCK:
        raise KeyboardInterrupt
      yield text

  with pytest.raises(KeyboardInterrupt):
    store.ensure(data, 'train', tokenizer, interrupted, log=quiet)
  assert store.read_manifest(path) is None
  leftovers = [name for name in os.listdir(path) if not name.startswith('.prepare')]
  assert leftovers == []  # no shard, no temporary file
  stream = pipeline.stored_split(data, tokenizer, 'train', quiet)
  assert stream.num_documents == pipeline.tokenize_split(data, tokenizer, 'train').num_documents


def test_batches_from_a_store_resume_bitwise(corpus_dir, tmp_path):
  data = data_config(corpus_dir, tmp_path)
  stream = pipeline.stored_split(data, tokenizers.ByteTokenizer(), 'train', quiet)
  take = lambda start, n: list(
    itertools.islice(pipeline.train_batches(stream, 32, 8, seed=4, start_step=start), n)
  )
  whole = take(0, 30)
  for k in (1, 17, 29):
    for a, b in zip(whole[k:], take(k, 30 - k)):
      np.testing.assert_array_equal(a['inputs'], b['inputs'])
      np.testing.assert_array_equal(a['targets'], b['targets'])


PREPARE = """
import json, pathlib, sys
sys.path.insert(0, {tests!r})
from conftest import tiny_config
from lmjax.data import store, pipeline, tokenizers
overrides = {{'data.cache_dir': {stores!r}, 'data.documents': 'lines'}}
data = tiny_config(pathlib.Path({corpus!r}), **overrides).data
tokenizer = tokenizers.ByteTokenizer()
texts = lambda: pipeline.texts(data, 'train')
path, manifest, prepared = store.ensure(data, 'train', tokenizer, texts, log=lambda m: None)
print(json.dumps({{'prepared': prepared, 'tokens': manifest['tokens'], 'path': path}}))
"""


def test_two_processes_preparing_one_store_end_with_one_good_store(corpus_dir, tmp_path):
  code = PREPARE.format(
    tests=str(REPO / 'tests'), corpus=str(corpus_dir), stores=str(tmp_path / 'stores')
  )
  processes = [
    subprocess.Popen(
      [sys.executable, '-c', code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    for _ in range(2)
  ]
  results = []
  for process in processes:
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-2000:]
    results.append(json.loads(out.strip().splitlines()[-1]))
  assert sorted(r['prepared'] for r in results) == [False, True]  # one prepared, one waited
  assert results[0]['tokens'] == results[1]['tokens'] and results[0]['path'] == results[1]['path']
  manifest = store.read_manifest(results[0]['path'])
  store.verify(results[0]['path'], manifest)
  names = sorted(os.listdir(results[0]['path']))
  assert not [n for n in names if '.tmp-' in n]
  assert len([n for n in names if n.startswith('tokens-')]) == 4


def test_an_empty_split_is_named(tmp_path):
  (tmp_path / 'train.txt').write_text('some text\n')
  (tmp_path / 'valid.txt').write_text('x\n')
  data = tiny_config(
    tmp_path,
    **{
      'data.files': str(tmp_path / 'train.txt'),
      'data.validation_files': str(tmp_path / 'valid.txt'),
      'data.cache_dir': str(tmp_path / 'stores'),
      'data.clean.min_doc_chars': 5,
    },
  ).data
  with pytest.raises(corpora.CorpusError, match="split 'validation' of corpus 'files' has no text"):
    pipeline.stored_split(data, tokenizers.ByteTokenizer(), 'validation', quiet)


def test_a_full_disk_is_one_clear_error_and_leaves_no_store(corpus_dir, tmp_path):
  with small_tmpfs(tmp_path / 'small', '200k') as mount:
    data = tiny_config(corpus_dir, **{'data.cache_dir': str(mount)}).data  # 180 kB of text
    tokenizer = tokenizers.ByteTokenizer()  # 2 bytes a token: 360 kB of tokens
    with pytest.raises(store.StoreError, match='the disk is full while preparing the token store'):
      pipeline.stored_split(data, tokenizer, 'train', quiet)
    path = store.directory(data, 'train', tokenizer)
    assert store.read_manifest(path) is None
    assert [n for n in os.listdir(path) if '.tmp-' in n or n.endswith('.bin')] == []


def test_prepare_verify_hashes_a_file_whose_time_was_put_back(corpus_dir, tmp_path):
  """A changed byte under an unchanged size and modification time passes the quick
  check at start-up; `lmjax.prepare --verify` hashes every file and names it."""
  data = data_config(corpus_dir, tmp_path)
  tokenizer = tokenizers.ByteTokenizer()
  pipeline.stored_split(data, tokenizer, 'train', quiet)
  path = store.directory(data, 'train', tokenizer)
  victim = os.path.join(path, store.shard_name('tokens', 0, 4))
  times = os.stat(victim)
  with open(victim, 'r+b') as f:
    f.write(b'\xff\xff')
  os.utime(victim, ns=(times.st_atime_ns, times.st_mtime_ns))
  store.verify(path, store.read_manifest(path))  # the quick check trusts it
  with pytest.raises(store.StoreError, match=f'{victim} fails its SHA-256 checksum'):
    store.verify(path, store.read_manifest(path), every_checksum=True)


def test_a_corpus_and_store_on_an_object_store_path_work_through_gfile(corpus_dir):
  """TensorFlow's in-memory filesystem (ram://) stands in for gs://: the same
  tf.io.gfile code paths (globs, ranged reads, renames, remote locks), no bucket."""
  import tensorflow as tf

  root = 'ram://lmjax-test'
  tf.io.gfile.makedirs(f'{root}/corpus')
  for name in ('part0.txt', 'part3.txt'):
    tf.io.gfile.copy(str(corpus_dir / name), f'{root}/corpus/{name}', overwrite=True)
  overrides = {
    'data.files': f'{root}/corpus/part0.txt',
    'data.validation_files': f'{root}/corpus/part3.txt',
    'data.cache_dir': f'{root}/stores',
    'data.documents': 'lines',
    'data.store_shards': 1,  # the stream in corpus order, as tokenize_split has it
  }
  data = tiny_config(corpus_dir, **overrides).data
  local = tiny_config(
    corpus_dir, **{'data.documents': 'lines', 'data.files': str(corpus_dir / 'part0.txt')}
  ).data
  tokenizer = tokenizers.ByteTokenizer()
  stream = pipeline.stored_split(data, tokenizer, 'train', quiet, packed_len=32)
  assert stream.tokens.remote and store.directory(data, 'train', tokenizer).startswith(root)
  expected = pipeline.tokenize_split(local, tokenizer, 'train')
  assert len(stream.tokens) == len(expected.tokens)
  starts = np.array([0, 5, 1000, len(expected.tokens) - 40])
  np.testing.assert_array_equal(
    stream.tokens.windows(starts, 33), expected.tokens[starts[:, None] + np.arange(33)]
  )
  batch = next(pipeline.train_batches(stream, 32, 8, seed=0, layout='packed'))
  assert batch['inputs'].shape == (8, 32) and batch['weights'].sum() > 0
  again = pipeline.stored_split(data, tokenizer, 'train', quiet, packed_len=32)  # reused
  np.testing.assert_array_equal(
    next(pipeline.train_batches(again, 32, 8, seed=0, layout='packed'))['targets'],
    batch['targets'],
  )
