"""Labelled text for sequence classification: (text, label) examples from a tfds
corpus (`imdb_reviews`, `ag_news_subset`, `glue/sst2`, ...) or from local
CSV, TSV or JSONL files, tokenized into fixed-length rows.

Every row starts with the end-of-document token (as packed pre-training rows
do), holds the text's first `seq_len - 1` tokens and is padded on the right;
`segment_ids` is 1 on tokens and 0 on padding. Labels are class indices:
integers as given, or text labels mapped by `classify.label_names` (sorted
training labels when empty; the run's config records them).
"""

import csv
import dataclasses
import json
import os

import numpy as np

from lmjax.data import cleaning
from lmjax.data import corpora

FORMATS = {'.csv': 'csv', '.tsv': 'tsv', '.jsonl': 'jsonl', '.json': 'jsonl'}


@dataclasses.dataclass(frozen=True)
class LabelledSplit:
  """One split as rows: inputs, positions, segment_ids [n, seq_len] (int32),
  targets (the labels) [n] int32 and weights [n] float32."""

  rows: dict
  num_classes: int

  def __len__(self) -> int:
    return len(self.rows['targets'])


def _read_file(path: str, text_key: str, label_key: str) -> list[tuple[str, object]]:
  kind = FORMATS.get(os.path.splitext(path)[1].lower())
  if kind is None:
    raise corpora.CorpusError(f'{path}: labelled files must be {", ".join(FORMATS)}')
  corpora.check_text_file(path)
  examples = []
  with open(path, encoding='utf-8', newline='') as f:
    if kind == 'jsonl':
      for number, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          record = json.loads(line)
        except json.JSONDecodeError as error:
          raise corpora.CorpusError(f'{path}:{number}: not JSON ({error})') from None
        examples.append(_pick(record, text_key, label_key, f'{path}:{number}'))
    else:
      reader = csv.DictReader(f, delimiter=',' if kind == 'csv' else '\t')
      for number, record in enumerate(reader, 2):
        examples.append(_pick(record, text_key, label_key, f'{path}:{number}'))
  if not examples:
    raise corpora.CorpusError(f'{path}: no labelled examples')
  return examples


def _pick(record, text_key: str, label_key: str, where: str):
  missing = [k for k in (text_key, label_key) if k not in record]
  if missing:
    raise corpora.CorpusError(
      f'{where}: no {" or ".join(map(repr, missing))} field (it has '
      f'{", ".join(map(repr, record))}); set data.text_key and '
      'classify.label_key'
    )
  return str(record[text_key]), record[label_key]


def _file_examples(data_config, classify_config, split: str):
  """A local split: the examples of each part of `corpora.split_plan` (a share of a
  file's examples, in order, where a text corpus would take a share of its lines)."""
  examples = []
  for path, start, end in corpora.checked_parts(data_config, split):
    records = _read_file(path, data_config.text_key, classify_config.label_key)
    position = np.arange(len(records)) / len(records)
    examples += [r for r, p in zip(records, position) if start <= p < end]
  return examples


def _tfds_examples(data_config, classify_config, split: str):
  text_key, label_key = data_config.text_key, classify_config.label_key
  dataset, features = corpora.tfds_examples(data_config, split, [text_key, label_key])
  examples = []
  for example in dataset.as_numpy_iterator():
    label = example[label_key]
    examples.append(
      (
        example[text_key].decode('utf-8', errors='replace'),
        label.decode('utf-8') if isinstance(label, bytes) else int(label),
      )
    )
  names = getattr(features[label_key], 'names', None)
  return examples, names


def read_split(data_config, classify_config, split: str):
  """(texts, raw labels, label names the source declares or None), cleaned as
  for language modelling."""
  if data_config.name == 'files':
    examples, names = _file_examples(data_config, classify_config, split), None
  else:
    examples, names = _tfds_examples(data_config, classify_config, split)
  if not examples:
    raise corpora.CorpusError(f'split {split!r} of {data_config.name!r} has no examples')
  texts = [cleaning.clean(text, data_config.clean) for text, _ in examples]
  return texts, [label for _, label in examples], names


def label_names(classify_config, raw_labels, declared=None) -> list[str]:
  """The class names, in class order: `classify.label_names`, else the source's
  (tfds ClassLabel names), else the sorted distinct training labels (text
  labels), else [] (integer labels are class indices already)."""
  if classify_config.label_names:
    return [name.strip() for name in classify_config.label_names.split(',')]
  if declared:
    return list(declared)
  if all(_is_int(label) for label in raw_labels):
    return []
  return sorted({str(label) for label in raw_labels})


def _is_int(label) -> bool:
  try:
    return int(str(label)) == float(str(label))
  except ValueError:
    return False


def label_ids(raw_labels, names: list[str], num_classes: int, split: str) -> np.ndarray:
  if names:
    index = {name: i for i, name in enumerate(names)}
    unknown = sorted(
      {str(label) for label in raw_labels if str(label) not in index and not _is_int(label)}
    )
    if unknown:
      raise corpora.CorpusError(
        f'split {split!r} has labels {unknown[:10]} that are not in classify.label_names {names}'
      )
    ids = [index[str(label)] if str(label) in index else int(str(label)) for label in raw_labels]
  else:
    ids = [int(str(label)) for label in raw_labels]
  ids = np.asarray(ids, np.int32)
  bad = ids[(ids < 0) | (ids >= num_classes)]
  if len(bad):
    raise corpora.CorpusError(
      f'split {split!r} has label {int(bad[0])}, outside the '
      f'{num_classes} classes 0..{num_classes - 1} (classify.num_classes)'
    )
  return ids


def encode(texts, labels: np.ndarray, tokenizer, seq_len: int, num_classes: int) -> LabelledSplit:
  """Tokenized rows: [EOS] + the text's first seq_len - 1 tokens, right-padded."""
  rows = len(texts)
  inputs = np.zeros((rows, seq_len), np.int32)
  segment_ids = np.zeros((rows, seq_len), np.int32)
  for i, ids in enumerate(tokenizer.encode_batch(list(texts))):
    ids = np.concatenate([[tokenizer.eos_id], np.asarray(ids, np.int32)[: seq_len - 1]])
    inputs[i, : len(ids)] = ids
    segment_ids[i, : len(ids)] = 1
  return LabelledSplit(
    rows={
      'inputs': inputs,
      'segment_ids': segment_ids,
      'positions': np.broadcast_to(np.arange(seq_len, dtype=np.int32), (rows, seq_len)).copy(),
      'targets': labels.astype(np.int32),
      'weights': np.ones(rows, np.float32),
    },
    num_classes=num_classes,
  )


@dataclasses.dataclass(frozen=True)
class Classes:
  """A classifier's classes: their count and names in class order (() when the
  labels are integers, class indices already)."""

  num_classes: int
  names: tuple[str, ...] = ()


def resolve_classes(data_config, classify_config, raw_labels, declared=None) -> Classes:
  """The classes of a training split's labels: classify.num_classes when set,
  else as many as the names, else the largest integer label + 1."""
  names = label_names(classify_config, raw_labels, declared)
  num_classes = classify_config.num_classes or (
    len(names) if names else int(max(int(str(label)) for label in raw_labels)) + 1
  )
  if num_classes < 2:
    raise corpora.CorpusError(
      f'the training split of {data_config.name!r} has a single class; '
      'classification needs at least 2 (classify.num_classes)'
    )
  return Classes(num_classes, tuple(names))


def load(
  data_config, classify_config, tokenizer, seq_len: int, splits, classes: Classes | None = None
) -> tuple[dict, Classes]:
  """({split: LabelledSplit}, classes). Without `classes`, the first split is the
  training split and resolves them (the config is not written to)."""
  result = {}
  for split in splits:
    texts, raw, declared = read_split(data_config, classify_config, split)
    if classes is None:
      classes = resolve_classes(data_config, classify_config, raw, declared)
    ids = label_ids(raw, list(classes.names), classes.num_classes, split)
    result[split] = encode(texts, ids, tokenizer, seq_len, classes.num_classes)
  return result, classes
