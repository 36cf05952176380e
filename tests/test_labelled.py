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
  with pytest.raises(corpora.CorpusError, match='labelled files must be .csv, .tsv'):
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
