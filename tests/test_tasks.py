"""Tasks as objects: a new task is one module's worth of code and no edit in the
loop, the evaluation or the steps; what the data decides is a derived record
saved with the run, and the config is never written to."""

import dataclasses
import json

import numpy as np
import pytest

from conftest import REPO
from conftest import tiny_config
from lmjax import checkpoint
from lmjax import config as config_lib
from lmjax import derived
from lmjax import evaluate
from lmjax import tasks
from lmjax import train
from lmjax.tasks import language


def reversed_stream(stream):
  """The split read right to left (its documents in reverse order too)."""
  offsets = stream.document_offsets()
  return dataclasses.replace(
    stream,
    tokens=np.ascontiguousarray(stream.tokens[::-1]),
    doc_starts=(len(stream.tokens) - offsets[::-1]).astype(np.int64),
  )


class RightToLeft(language.NextToken):
  """A task made only here: next-token prediction over the text read backwards."""

  name = 'right_to_left'
  generates_text = False

  def load(self, config, tokenizer, splits=None):
    data = super().load(config, tokenizer, splits)
    return dataclasses.replace(
      data,
      train=reversed_stream(data.train),
      eval=reversed_stream(data.eval),
      description='right to left: ' + data.description,
    )

  def load_evaluation(self, config, record, tokenizer, split):
    data = super().load_evaluation(config, record, tokenizer, split)
    return dataclasses.replace(data, eval=reversed_stream(data.eval))


def test_no_task_switch_outside_the_tasks():
  for name in ('train.py', 'loop.py', 'evaluate.py', 'steps.py', 'sample.py'):
    source = (REPO / 'lmjax' / name).read_text()
    assert 'config.task ==' not in source and 'config.task !=' not in source, name
    assert "'classify'" not in source and "'mlm'" not in source, name


@pytest.mark.slow
def test_a_task_registered_from_outside_trains_and_evaluates(
  corpus_dir, tmp_path, monkeypatch, capsys
):
  monkeypatch.setitem(tasks.REGISTRY, RightToLeft.name, RightToLeft())
  workdir = str(tmp_path / 'run')
  config = tiny_config(
    corpus_dir, **{'task': 'right_to_left', 'train.num_steps': 60, 'train.eval_every': 0}
  )
  result = train.train_and_evaluate(config, workdir)
  assert 'right to left: train' in capsys.readouterr().out
  assert result['loss'] < result['unigram_entropy'] - 0.2  # it learned the reversed text
  again = evaluate.evaluate_checkpoint(workdir, max_batches=8, log=lambda message: None)
  assert again['task'] == 'right_to_left'
  np.testing.assert_allclose(again['loss'], result['loss'], rtol=1e-5)
  # The same checkpoint evaluated on the text read forwards is much worse.
  monkeypatch.setitem(tasks.REGISTRY, RightToLeft.name, language.NextToken())
  forwards = evaluate.evaluate_checkpoint(workdir, max_batches=8, log=lambda message: None)
  assert forwards['loss'] > result['loss'] + 0.1


def write_labelled(path, count, seed):
  rng = np.random.default_rng(seed)
  words = {'yes': 'good fine great', 'no': 'bad awful poor'}
  lines = []
  for _ in range(count):
    label = str(rng.choice(list(words)))
    lines.append(
      json.dumps({'text': ' '.join(rng.permutation(words[label].split())), 'label': label})
    )
  path.write_text('\n'.join(lines) + '\n')


@pytest.mark.slow
def test_classes_and_epochs_go_to_the_derived_record_not_the_config(tmp_path):
  write_labelled(tmp_path / 'train.jsonl', 96, 0)
  write_labelled(tmp_path / 'valid.jsonl', 32, 1)
  config = tiny_config(
    tmp_path,
    **{
      'task': 'classify',
      'tokenizer.kind': 'bytes',
      'data.files': str(tmp_path / 'train.jsonl'),
      'data.validation_files': str(tmp_path / 'valid.jsonl'),
      'train.num_epochs': 3,
      'train.eval_every': 0,
      'sample.max_new_tokens': 0,
    },
  )
  before = config_lib.to_json(config)
  workdir = tmp_path / 'run'
  result = train.train_and_evaluate(config, str(workdir))
  assert config_lib.to_json(config) == before  # nothing was written into the config
  expected = derived.Derived(
    vocab_size=257, steps_per_epoch=3, num_steps=9, num_classes=2, label_names=('no', 'yes')
  )
  saved = derived.Derived.from_json(json.loads((workdir / 'derived.json').read_text()))
  assert saved == expected
  assert json.loads((workdir / 'config.json').read_text())['classify']['num_classes'] == 0
  manager = checkpoint.manager(str(workdir), read_only=True)
  assert manager.all_steps() == [9]
  assert checkpoint.read_run(manager, 9)[1] == expected
  # Evaluation rebuilds the 2-class head from the record alone.
  again = evaluate.evaluate_checkpoint(str(workdir), log=lambda message: None)
  assert again['examples'] == 32
  assert again['accuracy'] == pytest.approx(result['accuracy'], abs=1e-6)


def test_a_derived_record_with_an_unknown_field_is_refused():
  record = derived.Derived(vocab_size=10, steps_per_epoch=2, num_steps=4).to_json()
  assert derived.Derived.from_json(record).num_steps == 4
  with pytest.raises(ValueError, match=r"unknown fields \['typo'\]"):
    derived.Derived.from_json({**record, 'typo': 1})
