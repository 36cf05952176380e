"""What a run derives from its config and data, kept apart from the config.

The config is checked once, right after the flags (lmjax.validation), and is
never written to after that: what only the data can tell (the vocabulary size,
the steps of an epoch and so the run's length, a classifier's classes and
their names) lives in this record instead. It is saved beside the config, as
WORKDIR/derived.json and as the 'derived' item of every checkpoint, so a
restored run (evaluation, sampling, fine-tuning) rebuilds the same model from
the pair (config, derived) without reading its training data again.
"""

import dataclasses
import json
import os

from lmjax import fs


@dataclasses.dataclass(frozen=True)
class Derived:
  """The values a run derives; `from_json(to_json())` is the identity."""

  vocab_size: int  # the tokenizer's (the model may pad it: model.vocab_multiple)
  steps_per_epoch: int  # optimizer steps in one pass over the training split
  num_steps: int  # the schedule's length: train.num_steps, or num_epochs x steps_per_epoch
  num_classes: int = 0  # a classifier's classes (0: not a classifier)
  label_names: tuple[str, ...] = ()  # their names, in class order (() for integer labels)

  def to_json(self) -> dict:
    return {**dataclasses.asdict(self), 'label_names': list(self.label_names)}

  @classmethod
  def from_json(cls, record: dict) -> 'Derived':
    fields = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(record) - fields)
    if unknown:
      raise ValueError(f'derived record has unknown fields {unknown}; known: {sorted(fields)}')
    return cls(**{**record, 'label_names': tuple(record.get('label_names', ()))})

  def save(self, workdir: str) -> str:
    path = os.path.join(workdir, 'derived.json')
    with fs.open(path, 'w') as f:
      f.write(json.dumps(self.to_json(), indent=2) + '\n')
    return path


def num_steps(config, steps_per_epoch: int) -> int:
  """train.num_epochs passes over the split when set, else train.num_steps."""
  if config.train.num_epochs > 0:
    return config.train.num_epochs * steps_per_epoch
  return config.train.num_steps
