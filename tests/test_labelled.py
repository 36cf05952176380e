"""Labelled texts for classification: CSV, TSV and JSONL files, label mapping,
encoding into rows, and the errors that name the file and line."""

import json

import numpy as np
import pytest

from conftest import tiny_config
from lmjax.data import corpora
from lmjax.data import labelled
from lmjax.data import tokenizers


def config_for(path, validation='', **overrides):
  """Training examples from `path`; validation from `validation`, or from a
  copy of `path` when that is `path` itself (a file belongs to one split)."""
  if validation == path:
    validation = path.with_name('validation_copy' + path.suffix)
    validation.write_bytes(path.read_bytes())
  return tiny_config(
    path.parent,
    **{
      'task': 'classify',
      'data.files': str(path),
      'data.validation_files': str(validation),
      **overrides,
    },
  )


def test_csv_tsv_and_jsonl_read_the_same_examples(tmp_path):
  rows = [('Hello, "world"', 'pos'), ('tab\tfree? no: comma, yes', 'neg'), ('plain', 'pos')]
  (tmp_path / 'a.csv').write_text(
    'label,text\n'
    + ''.join(f'{label},"{text.replace(chr(34), chr(34) * 2)}"\n' for text, label in rows)
  )
  (tmp_path / 'a.jsonl').write_text(
    ''.join(json.dumps({'text': t, 'label': label}) + '\n' for t, label in rows)
  )
  (tmp_path / 'a.tsv').write_text(
    'text\tlabel\n' + ''.join(f'{t.replace(chr(9), " ")}\t{label}\n' for t, label in rows)
  )
  for name in ('a.csv', 'a.jsonl', 'a.tsv'):
    config = config_for(tmp_path / name, tmp_path / name)
    assert labelled.read_split(config.data, config.classify, 'train')[1] == ['pos', 'neg', 'pos']
    texts, raw, declared = labelled.read_split(config.data, config.classify, 'validation')
    assert raw == ['pos', 'neg', 'pos'] and declared is None
    expected = [t.replace('\t', ' ') if name == 'a.tsv' else t for t, _ in rows]
    assert texts == expected, name


def test_text_labels_map_to_sorted_or_given_names_and_rows_are_encoded(tmp_path):
  path = tmp_path / 'train.jsonl'
  path.write_text(
    ''.join(
      json.dumps({'text': 'x' * n, 'label': label}) + '\n'
      for n, label in ((3, 'b'), (40, 'a'), (0, 'c'), (5, 'a'))
    )
  )
  config = config_for(path, path)
  tokenizer = tokenizers.ByteTokenizer()
  before = config.to_json()
  splits, classes = labelled.load(
    config.data, config.classify, tokenizer, 32, ['train', 'validation']
  )
  assert classes == labelled.Classes(3, ('a', 'b', 'c'))
  assert config.to_json() == before  # the classes are derived, the config is not written to
  rows = splits['train'].rows
  np.testing.assert_array_equal(rows['targets'], [1, 0, 2, 0])
  assert (rows['inputs'][:, 0] == tokenizer.eos_id).all()  # every row starts a document
  np.testing.assert_array_equal(rows['segment_ids'].sum(1), [4, 32, 1, 6])  # truncated at 32
  assert (rows['inputs'][rows['segment_ids'] == 0] == 0).all()
  config = config_for(path, path, **{'classify.label_names': 'c,b,a'})
  splits, _ = labelled.load(config.data, config.classify, tokenizer, 32, ['train'])
  np.testing.assert_array_equal(splits['train'].rows['targets'], [1, 2, 0, 2])


def test_a_single_file_is_carved_into_train_and_validation(tmp_path):
  path = tmp_path / 'all.tsv'
  path.write_text('text\tlabel\n' + ''.join(f'line {i}\t{i % 2}\n' for i in range(100)))
  config = config_for(path, **{'data.validation_fraction': 0.2})
  train_texts, train_labels, _ = labelled.read_split(config.data, config.classify, 'train')
  valid_texts, _, _ = labelled.read_split(config.data, config.classify, 'validation')
  assert len(train_texts) == 80 and len(valid_texts) == 20
  assert not set(train_texts) & set(valid_texts)
  assert labelled.label_names(config.classify, train_labels) == []  # integers are classes


def test_bad_labelled_files_say_which_file_line_and_field(tmp_path):
  path = tmp_path / 'train.jsonl'
  path.write_text('{"text": "a", "label": 0}\n{"text": "b"\n')
  config = config_for(path)
  with pytest.raises(corpora.CorpusError, match=r'train.jsonl:2: not JSON'):
    labelled.read_split(config.data, config.classify, 'train')
  path.write_text('{"text": "a", "label": 0}\n{"review": "b", "label": 1}\n')
  with pytest.raises(
    corpora.CorpusError,
    match=r"train.jsonl:2: no 'text' field \(it has "
    r"'review', 'label'\)",
  ):
    labelled.read_split(config.data, config.classify, 'train')
  (tmp_path / 'train.txt').write_text('a\n')
  with pytest.raises(corpora.CorpusError, match='example files must be .csv, .tsv'):
    labelled.read_split(config_for(tmp_path / 'train.txt').data, config.classify, 'train')
  path.write_text('{"text": "a", "label": "yes"}\n{"text": "b", "label": "no"}\n')
  valid = tmp_path / 'valid.jsonl'
  valid.write_text('{"text": "c", "label": "maybe"}\n')
  config = config_for(path, valid)
  with pytest.raises(corpora.CorpusError, match=r"split 'validation' has labels \['maybe'\]"):
    labelled.load(
      config.data, config.classify, tokenizers.ByteTokenizer(), 16, ['train', 'validation']
    )
  path.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": 1}\n')
  config = config_for(path, **{'classify.num_classes': 1})
  with pytest.raises(corpora.CorpusError, match='at least 2'):
    labelled.load(config.data, config.classify, tokenizers.ByteTokenizer(), 16, ['train'])


def write_examples(path, count, seed=0):
  rng = np.random.default_rng(seed)
  words = ['good', 'bad', 'fine', 'poor', 'great', 'awful', 'plain']
  records = [
    {'text': ' '.join(rng.choice(words, rng.integers(1, 12))), 'label': ['neg', 'pos'][i % 3 == 0]}
    for i in range(count)
  ]
  path.write_text(''.join(json.dumps(r) + '\n' for r in records))
  return records


def test_labelled_rows_are_read_from_a_store_prepared_once(tmp_path, capsys):
  """Over several shards of several blocks: every example once, its row the
  text's tokens behind EOS, truncated; the second load reuses the store."""
  from lmjax.data import pipeline
  from lmjax.data import store

  records = write_examples(tmp_path / 'train.jsonl', 2600)
  write_examples(tmp_path / 'valid.jsonl', 50, seed=1)
  overrides = {'data.cache_dir': str(tmp_path / 'stores'), 'data.store_shards': 3}
  config = config_for(tmp_path / 'train.jsonl', tmp_path / 'valid.jsonl', **overrides)
  tokenizer = tokenizers.ByteTokenizer()
  splits, classes = labelled.load(config.data, config.classify, tokenizer, 24, ['train'])
  assert classes == labelled.Classes(2, ('neg', 'pos'))
  rows = splits['train'].rows
  assert isinstance(rows, labelled.LabelledRows) and len(rows) == 2600
  expected = sorted(
    (tuple([tokenizer.eos_id, *tokenizer.encode(r['text'])[:23].tolist()]), r['label'] == 'pos')
    for r in records
  )
  inputs, segments = rows['inputs'], rows['segment_ids']
  found = sorted(
    (tuple(inputs[i][segments[i] > 0].tolist()), bool(rows['targets'][i])) for i in range(2600)
  )
  assert found == expected
  path = store.directory(config.data, 'train', tokenizer, 'label')
  assert store.read_manifest(path)['shard_documents'] == [1024, 1024, 552]
  labelled.load(config.data, config.classify, tokenizer, 24, ['train'], classes)
  err = capsys.readouterr().err
  assert err.count("token store prepared for labelled split 'train': 2,600 examples") == 1
  assert "token store reused for labelled split 'train'" in err
  # Batches are rows of the store, resumable bitwise and split over processes.
  batches = lambda start, **kw: pipeline.row_batches(rows, 16, 5, start, **kw)
  whole = [next(b) for b in [batches(0)] for _ in range(200)]
  resumed = batches(170)
  for a in whole[170:]:
    b = next(resumed)
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  halves = [next(batches(9, process_index=p, process_count=2)) for p in range(2)]
  for key in whole[9]:
    np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), whole[9][key])


def test_a_damaged_labels_file_is_named(tmp_path):
  import os

  from lmjax.data import store

  write_examples(tmp_path / 'train.jsonl', 40)
  config = config_for(
    tmp_path / 'train.jsonl', tmp_path / 'train.jsonl', **{'data.cache_dir': str(tmp_path / 's')}
  )
  tokenizer = tokenizers.ByteTokenizer()
  labelled.load(config.data, config.classify, tokenizer, 16, ['train'])
  victim = os.path.join(
    store.directory(config.data, 'train', tokenizer, 'label'), store.shard_name('labels', 0, 4)
  )
  os.truncate(victim, 8)
  with pytest.raises(store.StoreError, match=f'token store file {victim} is truncated'):
    labelled.load(config.data, config.classify, tokenizer, 16, ['train'])
