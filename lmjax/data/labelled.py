"""Labelled text for sequence classification: (text, label) examples from a tfds
corpus (`imdb_reviews`, `ag_news_subset`, `glue/sst2`, ...) or from local
CSV, TSV or JSONL files, tokenized once into a labelled token store
(lmjax.data.store) and made into fixed-length rows on demand.

Every row starts with the end-of-document token (as packed pre-training rows
do), holds the text's first `seq_len - 1` tokens and is padded on the right;
`segment_ids` is 1 on tokens and 0 on padding. Labels are class indices:
integers as given, or text labels mapped by `classify.label_names` (sorted
training labels when empty; the run's derived record keeps them).
"""

import csv
import dataclasses
import json
import os
import sys
from collections.abc import Iterator

import numpy as np

from lmjax.data import cleaning
from lmjax.data import corpora
from lmjax.data import store

FORMATS = {'.csv': 'csv', '.tsv': 'tsv', '.jsonl': 'jsonl', '.json': 'jsonl'}


@dataclasses.dataclass(frozen=True)
class LabelledSplit:
  """One split as rows (`LabelledRows`, or a dict of arrays): inputs, positions,
  segment_ids [n, seq_len] (int32), targets (the labels) [n] int32 and
  weights [n] float32."""

  rows: object
  num_classes: int

  def __len__(self) -> int:
    return len(self.rows['targets'])


class LabelledRows:
  """A labelled split's rows, read from its store row by row: len(),
  take(indices) -> the batch arrays, and [name] for a whole column (the
  targets and weights are in memory; the others are read whole, for
  inspection and tests)."""

  def __init__(self, examples: store.Examples, targets: np.ndarray, seq_len: int, eos_id: int):
    self.examples, self.targets = examples, targets
    self.seq_len, self.eos_id = seq_len, eos_id

  def __len__(self) -> int:
    return len(self.targets)

  def take(self, indices) -> dict:
    indices = np.asarray(indices, np.int64).reshape(-1)
    inputs = np.zeros((len(indices), self.seq_len), np.int32)
    segment_ids = np.zeros((len(indices), self.seq_len), np.int32)
    for row, index in enumerate(indices.tolist()):
      ids = self.examples.tokens_of(index, self.seq_len - 1)
      inputs[row, 0], inputs[row, 1 : len(ids) + 1] = self.eos_id, ids
      segment_ids[row, : len(ids) + 1] = 1
    return {
      'inputs': inputs,
      'segment_ids': segment_ids,
      'positions': np.broadcast_to(np.arange(self.seq_len, dtype=np.int32), inputs.shape).copy(),
      'targets': self.targets[indices],
      'weights': np.ones(len(indices), np.float32),
    }

  def __getitem__(self, name: str) -> np.ndarray:
    if name == 'targets':
      return self.targets
    if name == 'weights':
      return np.ones(len(self), np.float32)
    return self.take(np.arange(len(self)))[name]


def read_records(path: str, keys, hint: str) -> list[tuple]:
  """The fields `keys` of every record of a local CSV, TSV or JSONL file, as
  tuples in file order (text fields as str); a missing field names the ones the
  record has and `hint` (the config keys to set). Shared by the labelled
  examples here and the text pairs of lmjax.data.pairs."""
  kind = FORMATS.get(os.path.splitext(path)[1].lower())
  if kind is None:
    raise corpora.CorpusError(f'{path}: example files must be {", ".join(FORMATS)}')
  corpora.check_text_file(path)
  records = []
  with open(path, encoding='utf-8', newline='') as f:
    if kind == 'jsonl':
      for number, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          record = json.loads(line)
        except json.JSONDecodeError as error:
          raise corpora.CorpusError(f'{path}:{number}: not JSON ({error})') from None
        records.append(_pick(record, keys, f'{path}:{number}', hint))
    else:
      reader = csv.DictReader(f, delimiter=',' if kind == 'csv' else '\t')
      for number, record in enumerate(reader, 2):
        records.append(_pick(record, keys, f'{path}:{number}', hint))
  if not records:
    raise corpora.CorpusError(f'{path}: no examples')
  return records


def _pick(record, keys, where: str, hint: str) -> tuple:
  if not isinstance(record, dict):
    raise corpora.CorpusError(f'{where}: a record must be an object with fields {list(keys)}')
  missing = [k for k in keys if k not in record]
  if missing:
    raise corpora.CorpusError(
      f'{where}: no {" or ".join(map(repr, missing))} field (it has '
      f'{", ".join(map(repr, record))}); set {hint}'
    )
  return (str(record[keys[0]]), *(record[k] for k in keys[1:]))


def _file_examples(data_config, classify_config, split: str) -> Iterator[tuple[str, object]]:
  """A local split: the examples of each part of `corpora.split_plan` (a share of a
  file's examples, in order, where a text corpus would take a share of its lines),
  read a file at a time."""
  for path, start, end in corpora.checked_parts(data_config, split):
    keys = (data_config.text_key, classify_config.label_key)
    records = read_records(path, keys, 'data.text_key and classify.label_key')
    position = np.arange(len(records)) / len(records)
    yield from (r for r, p in zip(records, position) if start <= p < end)


def _tfds_examples(data_config, classify_config, split: str) -> Iterator[tuple[str, object]]:
  text_key, label_key = data_config.text_key, classify_config.label_key
  dataset, _ = corpora.tfds_examples(data_config, split, [text_key, label_key])
  for example in dataset.prefetch(2).as_numpy_iterator():
    label = example[label_key]
    yield (
      example[text_key].decode('utf-8', errors='replace'),
      label.decode('utf-8') if isinstance(label, bytes) else int(label),
    )


def declared_names(data_config, classify_config, split: str) -> list[str] | None:
  """The label names a tfds corpus declares (a ClassLabel feature's), else None."""
  if data_config.name == 'files':
    return None
  keys = [data_config.text_key, classify_config.label_key]
  _, features = corpora.tfds_examples(data_config, split, keys)
  return getattr(features[classify_config.label_key], 'names', None)


def examples(data_config, classify_config, split: str) -> Iterator[tuple[str, object]]:
  """The split's (text, raw label) examples, streamed, texts cleaned as for
  language modelling (every example kept, however short)."""
  source = _file_examples if data_config.name == 'files' else _tfds_examples
  for text, label in source(data_config, classify_config, split):
    yield cleaning.clean(text, data_config.clean), label


def read_split(data_config, classify_config, split: str):
  """(texts, raw labels, label names the source declares or None), in memory."""
  pairs = list(examples(data_config, classify_config, split))
  if not pairs:
    raise corpora.CorpusError(f'split {split!r} of {data_config.name!r} has no examples')
  names = declared_names(data_config, classify_config, split)
  return [text for text, _ in pairs], [label for _, label in pairs], names


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


def _log(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def ensure_split(
  data_config, classify_config, tokenizer, split: str, log=_log, share=(0, 1)
) -> tuple[str, dict, bool]:
  """(path, manifest, whether this call prepared shards) of the split's labelled
  token store (lmjax.data.store), prepared first if missing; one log line."""
  texts = lambda: examples(data_config, classify_config, split)
  path, manifest, prepared = store.ensure(
    data_config, split, tokenizer, texts, share, log, classify_config.label_key
  )
  log(
    f'token store {"prepared" if prepared else "reused"} for labelled split {split!r}: '
    f'{manifest["documents"]:,} examples, {manifest["tokens"]:,} tokens ({path})'
  )
  return path, manifest, prepared


def load(
  data_config,
  classify_config,
  tokenizer,
  seq_len: int,
  splits,
  classes: Classes | None = None,
  log=_log,
  share: tuple[int, int] = (0, 1),
) -> tuple[dict, Classes]:
  """({split: LabelledSplit}, classes), each split read from its labelled token
  store (prepared first if missing, this process preparing its `share`).
  Without `classes`, the first split is the training split and resolves them
  from its distinct labels (the config is not written to)."""
  result = {}
  for split in splits:
    path, manifest, _ = ensure_split(data_config, classify_config, tokenizer, split, log, share)
    stored = store.Examples(path, manifest)
    shards = stored.labels()
    if classes is None:
      distinct = list({json.dumps(v): v for values, _ in shards for v in values}.values())
      declared = declared_names(data_config, classify_config, split)
      classes = resolve_classes(data_config, classify_config, distinct, declared)
    names = list(classes.names)
    targets = np.concatenate(
      [label_ids(values, names, classes.num_classes, split)[index] for values, index in shards]
    )
    rows = LabelledRows(stored, targets.astype(np.int32), seq_len, int(tokenizer.eos_id))
    result[split] = LabelledSplit(rows, classes.num_classes)
  return result, classes
