"""The tf.data pipeline: shapes, determinism, exact resume, per-process rows, full eval."""

import itertools

import numpy as np
import pytest

from conftest import tiny_config
from lmjax.data import corpora
from lmjax.data import pipeline
from lmjax.data import tokenizers


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
  starts = [
    int(
      np.flatnonzero(
        np.all(
          np.lib.stride_tricks.sliding_window_view(stream.tokens, 17) == np.append(row, t[-1]),
          axis=1,
        )
      )[0]
    )
    for row, t in zip(batch['inputs'], batch['targets'])
  ]
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
  unique = pipeline.TokenStream(
    tokens=np.arange(3000, dtype=np.int32), num_documents=1, num_bytes=3000
  )
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
  parts = [
    take(
      pipeline.train_batches(stream, 16, 8, seed=2, start_step=7, process_index=p, process_count=4),
      3,
    )
    for p in range(4)
  ]
  for step in range(3):
    assert parts[0][step]['inputs'].shape == (2, 16)
    joined = np.concatenate([parts[p][step]['inputs'] for p in range(4)])
    np.testing.assert_array_equal(joined, whole[step]['inputs'])
  with pytest.raises(ValueError, match='does not divide evenly over 3 processes'):
    next(pipeline.train_batches(stream, 16, 8, seed=2, process_count=3))


def in_stream_order(batches, key):
  """Batch i holds window i of every row: reorder to row-major (stream) order."""
  return np.stack([b[key] for b in batches], axis=1).reshape(-1)


def test_eval_batches_cover_every_target_once_as_carried_rows(stream):
  batches = list(pipeline.eval_batches(stream, seq_len=16, global_batch=8))
  targets, weights = in_stream_order(batches, 'targets'), in_stream_order(batches, 'weights')
  assert weights.sum() == len(stream.tokens) - 1
  np.testing.assert_array_equal(targets[weights > 0], stream.tokens[1:])
  np.testing.assert_array_equal(in_stream_order(batches, 'inputs')[weights > 0], stream.tokens[:-1])
  assert [b['reset'][0] for b in batches[:3]] == [1.0, 0.0, 0.0]
  limited = list(pipeline.eval_batches(stream, 16, 8, max_batches=2))
  assert len(limited) == 2


def documents_stream(lengths, seed=0):
  """Documents of the given lengths, each ending with EOS (0), as one stream."""
  rng = np.random.default_rng(seed)
  docs = [np.append(rng.integers(1, 50, n - 1), 0) for n in lengths]
  return pipeline.TokenStream(
    tokens=np.concatenate(docs).astype(np.int32),
    num_documents=len(docs),
    num_bytes=0,
    doc_starts=np.concatenate([[0], np.cumsum(lengths)]),
    eos_id=0,
  )


def test_packing_keeps_documents_whole_and_apart():
  lengths = np.random.default_rng(1).integers(2, 40, 300)
  stream = documents_stream(lengths)
  packed = stream.packed(16)
  segments, positions, weights = packed['segment_ids'], packed['positions'], packed['weights']
  assert weights.sum() == len(stream.tokens)  # every token is a target exactly once
  np.testing.assert_array_equal(weights, segments > 0)
  # Each segment is one document (or a 16-token piece of a longer one), whole.
  offsets = stream.document_offsets()
  expected = sorted(
    tuple(stream.tokens[start:end][i : i + 16])
    for start, end in zip(offsets[:-1], offsets[1:])
    for i in range(0, end - start, 16)
  )
  found = sorted(
    tuple(packed['targets'][row][segments[row] == seg])
    for row in range(len(segments))
    for seg in set(segments[row]) - {0}
  )
  assert found == expected
  # Inputs are the targets shifted right within a piece; a document starts from EOS.
  starts = (positions == 0) & (segments > 0)
  inner = (positions > 0) & (segments > 0)
  np.testing.assert_array_equal(
    packed['inputs'][:, 1:][inner[:, 1:]], packed['targets'][:, :-1][inner[:, 1:]]
  )
  first_token_of_doc = np.isin(
    np.flatnonzero(segments.reshape(-1) > 0), np.flatnonzero(starts.reshape(-1))
  )
  assert first_token_of_doc.sum() >= len(lengths)  # long documents add piece starts
  for row in range(len(segments)):  # segments count up 1, 2, ... then padding
    used = segments[row][segments[row] > 0]
    assert used[0] == 1 and np.all(np.diff(used) >= 0) and np.all(np.diff(used) <= 1)
    assert np.all(segments[row][len(used) :] == 0)
  # First fit over open rows leaves little padding.
  assert weights.mean() > 0.95


def test_packed_document_inputs_start_with_eos():
  stream = documents_stream([5, 3, 20])  # 20 > 16: cut into pieces of 16 and 4
  packed = stream.packed(16)
  tokens = stream.tokens
  # Row 0: document 1, document 2, then the 4-token end of document 3, which
  # first fit puts in row 0's free space; row 1: document 3's first 16 tokens.
  np.testing.assert_array_equal(
    packed['inputs'][0, :12], np.concatenate([[0], tokens[:4], [0], tokens[5:7], tokens[23:27]])
  )
  np.testing.assert_array_equal(
    packed['targets'][0, :12], np.concatenate([tokens[:5], tokens[5:8], tokens[24:28]])
  )
  assert list(packed['segment_ids'][0]) == [1] * 5 + [2] * 3 + [3] * 4 + [0] * 4
  assert list(packed['positions'][0, :12]) == [0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3]
  # A document's first input is EOS; a continuation piece's is the token before it.
  np.testing.assert_array_equal(packed['inputs'][1], np.concatenate([[0], tokens[8:23]]))
  assert packed['inputs'][0, 8] == tokens[23]


@pytest.mark.parametrize('layout', ['windows', 'packed', 'stream'])
def test_every_layout_resumes_exactly_and_splits_rows_over_processes(layout):
  stream = documents_stream(np.random.default_rng(3).integers(2, 40, 200))
  uninterrupted = take(pipeline.train_batches(stream, 16, 8, seed=1, layout=layout), 60)
  for k in (1, 29, 59):
    resumed = take(
      pipeline.train_batches(stream, 16, 8, seed=1, start_step=k, layout=layout), 60 - k
    )
    for a, b in zip(uninterrupted[k:], resumed):
      assert a.keys() == b.keys()
      for key in a:
        np.testing.assert_array_equal(a[key], b[key])
  parts = [
    take(
      pipeline.train_batches(
        stream, 16, 8, seed=1, start_step=5, process_index=p, process_count=2, layout=layout
      ),
      2,
    )
    for p in range(2)
  ]
  for step in range(2):
    for key in uninterrupted[0]:
      joined = np.concatenate([parts[0][step][key], parts[1][step][key]])
      np.testing.assert_array_equal(joined, uninterrupted[5 + step][key])


def test_packed_epochs_visit_every_row_once_in_a_new_order():
  stream = documents_stream(np.random.default_rng(4).integers(2, 40, 200))
  packed = stream.packed(16)
  per_epoch = pipeline.steps_per_epoch(stream, 16, 4, 'packed')
  assert per_epoch == len(packed['inputs']) // 4
  batches = take(pipeline.train_batches(stream, 16, 4, seed=0, layout='packed'), 2 * per_epoch)

  def row_ids(epoch):
    rows = np.concatenate([b['targets'] for b in epoch])
    return [int(np.flatnonzero(np.all(packed['targets'] == r, axis=1))[0]) for r in rows]

  first, second = row_ids(batches[:per_epoch]), row_ids(batches[per_epoch:])
  assert len(set(first)) == len(first) == per_epoch * 4
  assert first != second


def test_stream_rows_continue_from_step_to_step(stream):
  per_epoch = pipeline.steps_per_epoch(stream, 16, 8, 'stream')
  assert per_epoch == (5000 - 1) // 8 // 16
  batches = take(pipeline.train_batches(stream, 16, 8, seed=0, layout='stream'), per_epoch + 1)
  row_len = (5000 - 1) // 8
  for step, batch in enumerate(batches[:per_epoch]):
    for row in range(8):
      start = row * row_len + step * 16
      np.testing.assert_array_equal(batch['inputs'][row], stream.tokens[start : start + 16])
      np.testing.assert_array_equal(batch['targets'][row], stream.tokens[start + 1 : start + 17])
    assert np.all(batch['reset'] == float(step == 0))
  np.testing.assert_array_equal(batches[per_epoch]['inputs'], batches[0]['inputs'])  # new epoch
  assert np.all(batches[per_epoch]['reset'] == 1.0)


def test_packed_eval_covers_every_row_once_and_pads_the_last_batch():
  stream = documents_stream(np.random.default_rng(5).integers(2, 40, 50))
  rows = stream.packed(16)
  batches = list(pipeline.eval_batches(stream, 16, 8, layout='packed'))
  assert len(batches) == -(-len(rows['inputs']) // 8)
  assert all(b['inputs'].shape == (8, 16) for b in batches)
  for key in rows:
    joined = np.concatenate([b[key] for b in batches])
    np.testing.assert_array_equal(joined[: len(rows[key])], rows[key])
    assert not joined[len(rows[key]) :].any()  # padding rows weigh 0
  assert sum(b['weights'].sum() for b in batches) == len(stream.tokens)


def test_unknown_layout_names_the_valid_ones(stream):
  with pytest.raises(
    ValueError, match="data.layout must be one of windows, packed, stream; got 'rows'"
  ):
    next(pipeline.train_batches(stream, 16, 8, seed=0, layout='rows'))


def test_corpus_smaller_than_a_batch_says_how_many_tokens(stream):
  small = pipeline.TokenStream(tokens=stream.tokens[:100], num_documents=1, num_bytes=100)
  with pytest.raises(
    corpora.CorpusError,
    match=r'has 100 tokens; one batch of 8 x 16 needs '
    r'at least 145 \(layout .windows.\)',
  ):
    next(pipeline.train_batches(small, 16, 8, seed=0))
  with pytest.raises(
    corpora.CorpusError,
    match=r'has 100 tokens; one batch of 8 x 16 needs '
    r'at least 129 \(layout .stream.\)',
  ):
    next(pipeline.train_batches(small, 16, 8, seed=0, layout='stream'))
  with pytest.raises(
    corpora.CorpusError,
    match=r'has 100 tokens in 1 documents, which pack '
    r'into 7 rows of 16; one batch needs 8 rows',
  ):
    next(pipeline.train_batches(small, 16, 8, seed=0, layout='packed'))


def test_tokenize_split_joins_documents_with_eos(corpus_dir):
  config = tiny_config(corpus_dir)
  texts = list(pipeline.texts(config.data, 'train'))
  tokenizer = tokenizers.CharTokenizer.build(texts)
  stream = pipeline.tokenize_split(config.data, tokenizer, 'train')
  assert stream.num_documents == 3
  assert int((stream.tokens == tokenizer.eos_id).sum()) == 3
  assert stream.num_bytes == sum(len(t.encode()) for t in texts)
  assert tokenizer.decode(stream.tokens) == ''.join(texts)
  assert (
    1.0
    < pipeline.unigram_entropy(stream.tokens, tokenizer.vocab_size)
    < np.log(tokenizer.vocab_size)
  )


def test_global_batch_must_divide_over_data_parallel_devices():
  import ml_collections

  from lmjax import sharding

  mesh = sharding.make_mesh(ml_collections.ConfigDict({'data': 4, 'fsdp': 2, 'tensor': 1}))
  sharding.batch_size_check(16, mesh)
  with pytest.raises(
    ValueError,
    match=r'train.batch_size=12 must be divisible by the 8 '
    r'data-parallel shards',
  ):
    sharding.batch_size_check(12, mesh)


def test_split_emptied_by_cleaning_is_named(corpus_dir):
  config = tiny_config(corpus_dir, **{'data.clean.min_doc_chars': 10**9})
  tokenizer = tokenizers.ByteTokenizer()
  with pytest.raises(corpora.CorpusError, match="split 'validation' of corpus 'files' has no text"):
    pipeline.tokenize_split(config.data, tokenizer, 'validation')


def test_documents_can_be_paragraphs_or_lines(tmp_path):
  (tmp_path / 'a.txt').write_text('one\ntwo\n\nthree\n')
  (tmp_path / 'b.txt').write_text('training text\n')
  config = tiny_config(
    tmp_path,
    **{'data.files': str(tmp_path / 'b.txt'), 'data.validation_files': str(tmp_path / 'a.txt')},
  )
  config.data.documents = 'paragraphs'
  assert list(pipeline.texts(config.data, 'validation')) == ['one\ntwo', 'three\n']
  config.data.documents = 'lines'
  assert list(pipeline.texts(config.data, 'validation')) == ['one', 'two', 'three']
  stream = pipeline.tokenize_split(config.data, tokenizers.ByteTokenizer(), 'validation')
  assert list(stream.doc_starts) == [0, 4, 8, 14] and stream.eos_id == 256
  config.data.documents = 'sentences'
  with pytest.raises(corpora.CorpusError, match='data.documents must be one of'):
    list(pipeline.texts(config.data, 'validation'))


@pytest.mark.parametrize('layout', ['windows', 'packed'])
def test_masking_is_bert_style_deterministic_resumable_and_per_process(layout):
  stream = documents_stream(np.random.default_rng(5).integers(2, 40, 300))
  masking = pipeline.Masking(mask_id=97, vocab_size=97)
  batches = lambda **kwargs: pipeline.train_batches(
    stream, 32, 16, seed=2, layout=layout, masking=masking, **kwargs
  )
  uninterrupted = take(batches(), 40)
  chosen = np.concatenate([b['weights'].ravel() > 0 for b in uninterrupted])
  inputs = np.concatenate([b['inputs'].ravel() for b in uninterrupted])
  targets = np.concatenate([b['targets'].ravel() for b in uninterrupted])
  present = np.concatenate(
    [
      (b['segment_ids'] if 'segment_ids' in b else np.ones_like(b['inputs'])).ravel() > 0
      for b in uninterrupted
    ]
  )
  assert not chosen[~present].any()  # padding is never a prediction
  assert abs(chosen[present].mean() - 0.15) < 0.01
  assert (inputs[~chosen] == targets[~chosen]).all()  # unchosen tokens are untouched
  masked = inputs[chosen] == 97
  kept = inputs[chosen] == targets[chosen]
  assert abs(masked.mean() - 0.8) < 0.03 and abs(kept.mean() - 0.1) < 0.03
  assert (targets[chosen] < 97).all() and (inputs < 98).all()
  for k in (1, 17):  # a resumed run draws the same masks
    for a, b in zip(uninterrupted[k:], take(batches(start_step=k), 40 - k)):
      for key in a:
        np.testing.assert_array_equal(a[key], b[key])
  parts = [take(batches(start_step=3, process_index=p, process_count=2), 1)[0] for p in range(2)]
  for key in uninterrupted[3]:
    np.testing.assert_array_equal(
      np.concatenate([parts[0][key], parts[1][key]]), uninterrupted[3][key]
    )
  first, again = (
    next(iter(pipeline.eval_batches(stream, 32, 16, layout=layout, masking=masking, seed=2)))
    for _ in range(2)
  )
  np.testing.assert_array_equal(first['inputs'], again['inputs'])  # every evaluation alike
