"""The tf.data pipeline: shapes, determinism, exact resume, per-process rows, full eval."""
import itertools

import numpy as np
import pytest

from conftest import tiny_config
from lmjax.data import corpora, pipeline, tokenizers


@pytest.fixture(scope='module')
def stream():
  tokens = np.arange(5000, dtype=np.int32) % 97
  return pipeline.TokenStream(tokens=tokens, num_documents=1, num_bytes=5000)


def take(iterator, n):
  return list(itertools.islice(iterator, n))


def test_shapes_and_shift(stream):
  batch = next(pipeline.train_batches(stream, seq_len=16, global_batch=8, seed=0))
  assert batch['inputs'].shape == batch['targets'].shape == batch['weights'].shape == (8, 16)
  assert batch['inputs'].dtype == np.int32 and batch['weights'].dtype == np.float32
  np.testing.assert_array_equal(batch['inputs'][:, 1:], batch['targets'][:, :-1])
  # Windows are contiguous slices of the stream.
  starts = [int(np.flatnonzero(np.all(np.lib.stride_tricks.sliding_window_view(
      stream.tokens, 17) == np.append(row, t[-1]), axis=1))[0])
            for row, t in zip(batch['inputs'], batch['targets'])]
  assert len(set(starts)) == 8


def test_deterministic_for_a_seed_and_different_across_seeds(stream):
  first = take(pipeline.train_batches(stream, 16, 8, seed=3), 5)
  again = take(pipeline.train_batches(stream, 16, 8, seed=3), 5)
  other = take(pipeline.train_batches(stream, 16, 8, seed=4), 5)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a['inputs'], b['inputs'])
  assert any(not np.array_equal(a['inputs'], c['inputs']) for a, c in zip(first, other))


def test_resume_at_step_k_sees_the_same_batches(stream):
  # 5000 tokens / 16 = 311 windows per epoch: 100 steps of 8 cross two epoch boundaries.
  uninterrupted = take(pipeline.train_batches(stream, 16, 8, seed=1), 100)
  for k in (1, 38, 39, 77, 99):
    resumed = take(pipeline.train_batches(stream, 16, 8, seed=1, start_step=k), 100 - k)
    for a, b in zip(uninterrupted[k:], resumed):
      np.testing.assert_array_equal(a['inputs'], b['inputs'])
      np.testing.assert_array_equal(a['targets'], b['targets'])


def test_each_epoch_visits_every_window_once_with_its_own_offset():
  unique = pipeline.TokenStream(tokens=np.arange(3000, dtype=np.int32), num_documents=1,
                                num_bytes=3000)
  per_epoch = pipeline.windows_per_epoch(3000, 16)
  batches = take(pipeline.train_batches(unique, 16, 1, seed=0), 2 * per_epoch)
  starts = np.array([int(b['inputs'][0, 0]) for b in batches])  # token value == position
  for epoch in (starts[:per_epoch], starts[per_epoch:]):
    assert len(set(epoch)) == per_epoch  # every window once
    assert len(set(epoch % 16)) == 1  # one offset per epoch
    assert sorted(epoch // 16) == list(range(per_epoch))
  assert list(starts[:per_epoch]) != list(starts[per_epoch:])  # reshuffled


def test_processes_read_disjoint_rows_whose_union_is_the_global_batch(stream):
  whole = take(pipeline.train_batches(stream, 16, 8, seed=2, start_step=7), 3)
  parts = [take(pipeline.train_batches(stream, 16, 8, seed=2, start_step=7, process_index=p,
                                       process_count=4), 3) for p in range(4)]
  for step in range(3):
    assert parts[0][step]['inputs'].shape == (2, 16)
    joined = np.concatenate([parts[p][step]['inputs'] for p in range(4)])
    np.testing.assert_array_equal(joined, whole[step]['inputs'])
  with pytest.raises(ValueError, match='does not divide evenly over 3 processes'):
    next(pipeline.train_batches(stream, 16, 8, seed=2, process_count=3))


def test_eval_batches_cover_every_target_once(stream):
  batches = list(pipeline.eval_batches(stream, seq_len=16, global_batch=8))
  targets = np.concatenate([b['targets'].reshape(-1) for b in batches])
  weights = np.concatenate([b['weights'].reshape(-1) for b in batches])
  assert weights.sum() == len(stream.tokens) - 1
  np.testing.assert_array_equal(targets[weights > 0], stream.tokens[1:])
  limited = list(pipeline.eval_batches(stream, 16, 8, max_batches=2))
  assert len(limited) == 2


def test_corpus_smaller_than_a_batch_says_how_many_tokens(stream):
  small = pipeline.TokenStream(tokens=stream.tokens[:100], num_documents=1, num_bytes=100)
  with pytest.raises(corpora.CorpusError, match=r'has 100 tokens; one batch of 8 x 16 needs'):
    next(pipeline.train_batches(small, 16, 8, seed=0))


def test_tokenize_split_joins_documents_with_eos(corpus_dir):
  config = tiny_config(corpus_dir)
  texts = list(pipeline.texts(config.data, 'train'))
  tokenizer = tokenizers.CharTokenizer.build(texts)
  stream = pipeline.tokenize_split(config.data, tokenizer, 'train')
  assert stream.num_documents == 3
  assert int((stream.tokens == tokenizer.eos_id).sum()) == 3
  assert stream.num_bytes == sum(len(t.encode()) for t in texts)
  assert tokenizer.decode(stream.tokens) == ''.join(texts)
  assert 1.0 < pipeline.unigram_entropy(stream.tokens, tokenizer.vocab_size) < np.log(
      tokenizer.vocab_size)


def test_global_batch_must_divide_over_data_parallel_devices():
  import ml_collections
  from lmjax import sharding
  mesh = sharding.make_mesh(ml_collections.ConfigDict({'data': 4, 'fsdp': 2, 'tensor': 1}))
  sharding.batch_size_check(16, mesh)
  with pytest.raises(ValueError, match=r'train.batch_size=12 must be divisible by the 8 '
                                       r'data-parallel shards'):
    sharding.batch_size_check(12, mesh)
