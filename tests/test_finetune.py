"""Masked-LM pre-training, fine-tuning (full, frozen backbone, LoRA) and text
classification, end to end on real files and real Orbax checkpoints.

The labelled set is made here from tiny-shakespeare lines: half are real, half
corrupted (reversed, or with 30 % of their letters replaced at random), so
telling them apart needs knowledge of the language, which masked-LM
pre-training provides and 100 steps from scratch do not.
"""

import json
import os
import random

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from sklearn import metrics as sklearn_metrics

from conftest import shakespeare_text
from conftest import tiny_config
from lmjax import checkpoint
from lmjax import evaluate
from lmjax import finetune
from lmjax import merge
from lmjax import train
from lmjax.data import tokenizers

pytestmark = pytest.mark.slow

LETTERS = 'abcdefghijklmnopqrstuvwxyz'


def _corrupt(line: str, rng: random.Random) -> str:
  if rng.random() < 0.5:
    return line[::-1]
  return ''.join(rng.choice(LETTERS) if c.isalpha() and rng.random() < 0.3 else c for c in line)


def write_labelled(directory, num_train: int = 256, num_valid: int = 512):
  """JSONL files of {"text", "label": "real" | "corrupted"}, balanced, from lines
  of the corpus that pre-training does not see (past its first 240,000 chars)."""
  rng = random.Random(0)
  lines = [line for line in shakespeare_text()[300_000:].split('\n') if len(line.split()) >= 4]
  rng.shuffle(lines)
  paths = []
  for name, chosen in (
    ('train', lines[:num_train]),
    ('valid', lines[num_train : num_train + num_valid]),
  ):
    path = directory / f'{name}.jsonl'
    with open(path, 'w', encoding='utf-8') as f:
      for i, line in enumerate(chosen):
        real = i % 2 == 0
        f.write(
          json.dumps(
            {
              'text': line if real else _corrupt(line, rng),
              'label': 'real' if real else 'corrupted',
            }
          )
          + '\n'
        )
    paths.append(path)
  return paths


def mlm_config(corpus_dir, **overrides):
  return tiny_config(
    corpus_dir,
    **{
      'task': 'mlm',
      'model.family': 'encoder',
      # Learned positions sat on a plateau near the unigram loss for 2 of 3 seeds and
      # 2 of 3 window orders (3.03-3.11 nats after 600 steps); with RoPE, 1.95-2.09.
      'model.positions': 'rope',
      'data.seq_len': 64,
      'train.num_steps': 600,
      'train.eval_every': 0,
      'checkpoint.every': 600,
      'sample.max_new_tokens': 0,
      **overrides,
    },
  )


def classify_config(corpus_dir, labelled, **overrides):
  train_file, valid_file = labelled
  return tiny_config(
    corpus_dir,
    **{
      'task': 'classify',
      'model.family': 'encoder',
      'model.positions': 'rope',  # as the pre-trained encoder
      'data.files': str(train_file or ''),
      'data.validation_files': str(valid_file or ''),
      'data.seq_len': 64,
      'train.batch_size': 16,
      'train.num_steps': 100,
      'train.eval_every': 0,
      'train.final_eval_batches': -1,
      'checkpoint.every': 100,
      'sample.max_new_tokens': 0,
      **overrides,
    },
  )


FINETUNING = {
  'scratch': {},
  'full': {'finetune.mode': 'full'},
  'frozen': {'finetune.mode': 'frozen', 'optimizer.learning_rate': 0.03},
  'lora': {'finetune.mode': 'lora', 'optimizer.learning_rate': 0.01},
}


@pytest.fixture(scope='module')
def runs(corpus_dir, tmp_path_factory):
  base = tmp_path_factory.mktemp('finetune')
  labelled = write_labelled(base)
  pretrain_dir = str(base / 'mlm')
  results = {'mlm': train.train_and_evaluate(mlm_config(corpus_dir), pretrain_dir)}
  for name, overrides in FINETUNING.items():
    if name != 'scratch':
      overrides = {**overrides, 'init_from': pretrain_dir}
    results[name] = train.train_and_evaluate(
      classify_config(corpus_dir, labelled, **overrides), str(base / name)
    )
  print(
    '\nclassification on held-out lines:',
    json.dumps(
      {
        name: {k: round(results[name][k], 4) for k in ('accuracy', 'f1_macro', 'roc_auc')}
        for name in FINETUNING
      }
    ),
  )
  return {'base': base, 'labelled': labelled, 'pretrain_dir': pretrain_dir, **results}


def test_masked_lm_learns_below_the_unigram_baseline(runs):
  result = runs['mlm']
  assert result['loss'] < result['unigram_entropy'] - 0.3
  # Only the masked positions are scored: about 15 % of the evaluated tokens.
  assert 0.10 < result['tokens'] / (8 * 32 * 64) < 0.20


def test_every_fine_tuning_beats_the_majority_class(runs):
  for name in ('full', 'frozen', 'lora'):
    result = runs[name]
    assert result['majority_baseline'] == 0.5
    assert result['accuracy'] > result['majority_baseline'] + 0.05, (name, result)
    assert result['roc_auc'] > 0.6, (name, result)


def test_pretrained_encoder_beats_the_same_encoder_from_scratch(runs):
  assert runs['full']['accuracy'] > runs['scratch']['accuracy'] + 0.1
  assert runs['full']['roc_auc'] > runs['scratch']['roc_auc'] + 0.1


def test_evaluate_writes_exact_classifier_metrics(runs, tmp_path):
  """`lmjax.evaluate` on the fine-tuned run: the same numbers as the run's final
  evaluation, and the same as scikit-learn on the model's own predictions."""
  workdir = str(runs['base'] / 'full')
  result = evaluate.evaluate_checkpoint(workdir, log=lambda message: None)
  assert result['task'] == 'classify' and result['examples'] == 512
  for key in ('accuracy', 'f1_macro', 'precision', 'recall', 'roc_auc'):
    assert result[key] == pytest.approx(runs['full'][key], abs=1e-6)
  restored = evaluate.restore_for_inference(workdir)
  data = restored.task.load_evaluation(
    restored.config, restored.derived, restored.tokenizer, 'validation'
  )
  logits = restored.model.apply(
    {'params': restored.params},
    data.eval.rows['inputs'],
    segment_ids=data.eval.rows['segment_ids'],
  )
  probabilities = np.asarray(jax.nn.softmax(logits))
  labels = data.eval.rows['targets']
  assert result['roc_auc'] == pytest.approx(
    sklearn_metrics.roc_auc_score(labels, probabilities[:, 1]), abs=1e-5
  )
  assert result['f1_macro'] == pytest.approx(
    sklearn_metrics.f1_score(labels, probabilities.argmax(-1), average='macro'), abs=1e-6
  )


def _params(workdir, step=100):
  checkpoints = checkpoint.manager(workdir, read_only=True)
  params = evaluate.restore_for_inference(workdir, str(step)).params
  checkpoints.close()
  return params


def test_frozen_backbone_is_bitwise_the_pretrained_one(runs, corpus_dir, tmp_path):
  pretrained = _params(runs['pretrain_dir'], 600)
  tuned = _params(str(runs['base'] / 'frozen'))
  same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), pretrained, tuned['backbone'])
  assert all(jax.tree.leaves(same))
  # The new head trained: it moved away from the parameters the run started from.
  config = classify_config(
    corpus_dir, runs['labelled'], **{**FINETUNING['frozen'], 'init_from': runs['pretrain_dir']}
  )
  initial = jax.device_get(train.setup(config, str(tmp_path / 'start')).model_params())
  assert all(
    jax.tree.leaves(
      jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), initial['backbone'], tuned['backbone'])
    )
  )
  moved = np.abs(np.asarray(tuned['head']['kernel']) - np.asarray(initial['head']['kernel']))
  assert moved.max() > 1e-3


def test_lora_trains_only_its_adapters(runs, tmp_path, capsys):
  """Three LoRA steps: the frozen base stays bitwise the pre-trained weights, the
  adapters and head move; the trainable count is printed and is what it should be."""
  config = classify_config(
    tmp_path,
    runs['labelled'],
    **{'init_from': runs['pretrain_dir'], 'finetune.mode': 'lora', 'optimizer.learning_rate': 0.01},
  )
  run = train.setup(config, str(tmp_path / 'lora_steps'))
  before = jax.device_get(run.state)
  batches = run.train_batches(0)
  for _ in range(3):
    run.state, _ = run.train_step(run.state, run.train_step.place(next(batches)), jax.random.key(0))
  after = jax.device_get(run.state)
  pretrained = _params(runs['pretrain_dir'], 600)
  frozen_same = jax.tree.map(
    lambda a, b, c: np.array_equal(a, b) and np.array_equal(b, c),
    before.frozen['backbone'],
    after.frozen['backbone'],
    pretrained,
  )
  assert all(jax.tree.leaves(frozen_same))
  b_moved = [
    np.abs(b).sum() > 0
    for name, b in finetune.flatten(after.params['lora']).items()
    if name.endswith('/b')
  ]
  assert b_moved and all(b_moved)
  assert not np.array_equal(
    before.params['new']['head']['kernel'], after.params['new']['head']['kernel']
  )
  expected = (
    sum(max(layers, 1) * (rows * 8 + 8 * columns) for _, rows, columns, layers in run.plan.matrices)
    + 64 * 2
    + 2
  )
  assert train.trainable_count(run.state, run.plan) == expected
  assert f'{expected:,} trainable' in capsys.readouterr().out
  run.checkpoints.close()


def test_lora_checkpoint_holds_no_base_weights_and_merges(runs, tmp_path):
  lora_dir = str(runs['base'] / 'lora')
  checkpoints = checkpoint.manager(lora_dir, read_only=True)
  saved = checkpoints.item_metadata(100)['state']['params']
  checkpoints.close()
  assert sorted(saved) == ['lora', 'new'] and sorted(saved['new']) == ['head', 'head_bias']
  merged_dir = str(tmp_path / 'merged')
  assert merge.merge(lora_dir, merged_dir, log=lambda message: None) == 100
  quiet = lambda message: None
  lora = evaluate.evaluate_checkpoint(lora_dir, log=quiet)
  merged = evaluate.evaluate_checkpoint(merged_dir, log=quiet)
  for key in ('accuracy', 'f1_macro', 'roc_auc', 'loss'):
    assert merged[key] == pytest.approx(lora[key], abs=1e-6)
  with pytest.raises(checkpoint.CheckpointError, match='not a LoRA run'):
    merge.merge(str(runs['base'] / 'full'), str(tmp_path / 'again'), log=quiet)


def _state_bytes(workdir: str, step: int) -> int:
  path = os.path.join(checkpoint.directory(workdir), str(step), 'state')
  return sum(
    os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(path) for name in names
  )


def test_lora_checkpoints_are_a_small_fraction_of_full_ones(corpus_dir, tmp_path):
  """A wider model (0.4 M parameters): one step of full fine-tuning and one of
  LoRA (rank 4 on the attention projections) from the same pre-training run."""
  wide = {
    'model.embed_dim': 128,
    'model.num_heads': 4,
    'train.num_steps': 1,
    'train.batch_size': 8,
    'train.final_eval_batches': 1,
    'checkpoint.every': 1,
    'sample.max_new_tokens': 0,
  }
  pretrain_dir = str(tmp_path / 'pretrain')
  train.train_and_evaluate(tiny_config(corpus_dir, **wide), pretrain_dir)
  sizes = {}
  for mode in ('full', 'lora'):
    workdir = str(tmp_path / mode)
    train.train_and_evaluate(
      tiny_config(
        corpus_dir,
        **wide,
        **{
          'init_from': pretrain_dir,
          'finetune.mode': mode,
          'finetune.lora_rank': 4,
          'finetune.lora_targets': r'attention/(qkv|out)/kernel$',
        },
      ),
      workdir,
    )
    sizes[mode] = _state_bytes(workdir, 1)
  print(f'\ncheckpoint state bytes: {sizes}')
  assert sizes['lora'] < 0.2 * sizes['full']


def test_causal_lm_fine_tuning_with_lora_lowers_the_loss_on_a_new_corpus(corpus_dir, tmp_path):
  """A decoder pre-trained on parts 0-1 is LoRA-tuned on part 2: the validation
  loss falls from the pre-trained model's. Then it becomes a classifier."""
  pretrain_dir = str(tmp_path / 'pretrain')
  common = {
    'data.validation_files': str(corpus_dir / 'part3.txt'),
    'train.eval_every': 0,
    'sample.max_new_tokens': 0,
    'train.final_eval_batches': 4,
  }
  before = train.train_and_evaluate(
    tiny_config(
      corpus_dir,
      **common,
      **{'data.files': str(corpus_dir / 'part[01].txt'), 'train.num_steps': 200},
    ),
    pretrain_dir,
  )
  after = train.train_and_evaluate(
    tiny_config(
      corpus_dir,
      **common,
      **{
        'data.files': str(corpus_dir / 'part2.txt'),
        'train.num_steps': 40,
        'init_from': pretrain_dir,
        'finetune.mode': 'lora',
        'finetune.lora_rank': 4,
        'optimizer.learning_rate': 0.01,
      },
    ),
    str(tmp_path / 'lora'),
  )
  assert after['loss'] < before['loss'] - 0.02
  # The same decoder as a classifier (its last token's state), fine-tuned whole.
  records = noisy_records()
  for name, chunk in (('train.jsonl', records[:512]), ('valid.jsonl', records[512:])):
    (tmp_path / name).write_text('\n'.join(json.dumps(r) for r in chunk) + '\n')
  classifier = train.train_and_evaluate(
    classify_config(
      corpus_dir,
      (tmp_path / 'train.jsonl', tmp_path / 'valid.jsonl'),
      **{'model.family': 'transformer', 'data.seq_len': 32, 'init_from': pretrain_dir},
    ),
    str(tmp_path / 'classifier'),
  )
  assert classifier['accuracy'] > 0.75, classifier


def noisy_records(count: int = 768) -> list[dict]:
  """Lines of the corpus, every other one with 30 % of its letters replaced by
  rare ones (label 1): the letters' statistics alone tell them apart."""
  rng = random.Random(1)
  lines = [
    line for line in shakespeare_text()[300_000:400_000].split('\n') if len(line.split()) >= 4
  ]
  records = []
  for i, line in enumerate(lines[:count]):
    noisy = ''.join(
      rng.choice('qxzjkvw') if c.isalpha() and rng.random() < 0.3 else c for c in line
    )
    records.append({'text': noisy if i % 2 else line, 'label': i % 2})
  return records


@pytest.mark.parametrize('family', ['lstm', 'transformer'])
def test_recurrent_and_decoder_classifiers_learn(family, corpus_dir, tmp_path):
  """The LSTM classifier (its final state) and the decoder's last token, from
  scratch; labels given as integers in TSV files."""
  records = noisy_records()
  for name, chunk in (('train.tsv', records[:512]), ('valid.tsv', records[512:])):
    lines = ['label\ttext'] + [f'{r["label"]}\t{r["text"]}' for r in chunk]
    (tmp_path / name).write_text('\n'.join(lines) + '\n')
  result = train.train_and_evaluate(
    classify_config(
      corpus_dir, (tmp_path / 'train.tsv', tmp_path / 'valid.tsv'), **{'model.family': family}
    ),
    str(tmp_path / family),
  )
  assert result['examples'] == 256 and result['accuracy'] > 0.75, result


class NoisyLines(tfds.core.GeneratorBasedBuilder):
  """A real tfds builder of labelled lines, with ClassLabel names."""

  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(
      builder=self,
      features=tfds.features.FeaturesDict(
        {
          'sentence': tfds.features.Text(),
          'label': tfds.features.ClassLabel(names=['clean', 'noisy']),
        }
      ),
    )

  def _split_generators(self, dl_manager):
    records = noisy_records()
    return {
      'train': self._generate_examples(records[:512]),
      'validation': self._generate_examples(records[512:]),
    }

  def _generate_examples(self, records):
    for i, record in enumerate(records):
      yield i, {'sentence': record['text'], 'label': record['label']}


def test_classifier_reads_a_tfds_corpus_and_its_label_names(corpus_dir, tmp_path):
  data_dir = tmp_path / 'tfds'
  NoisyLines(data_dir=str(data_dir)).download_and_prepare()
  config = classify_config(
    corpus_dir,
    (None, None),
    **{
      'data.name': 'noisy_lines',
      'data.data_dir': str(data_dir),
      'data.text_key': 'sentence',
      'optimizer.learning_rate': 0.01,
    },
  )
  result = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert result['examples'] == 256 and result['accuracy'] > 0.75, result
  saved = json.loads((tmp_path / 'run' / 'derived.json').read_text())  # the tfds ClassLabel's
  assert saved['label_names'] == ['clean', 'noisy']
  assert saved['num_classes'] == 2
  config = json.loads((tmp_path / 'run' / 'config.json').read_text())
  assert config['classify']['label_names'] == '' and config['classify']['num_classes'] == 0


def test_fine_tuning_errors_say_what_differs(runs, corpus_dir, tmp_path):
  config = classify_config(
    corpus_dir, runs['labelled'], **{'init_from': runs['pretrain_dir'], 'tokenizer.kind': 'bytes'}
  )
  with pytest.raises(tokenizers.TokenizerError, match="trained with a 'chars' tokenizer"):
    train.train_and_evaluate(config, str(tmp_path / 'tokenizer'))
  config = classify_config(
    corpus_dir, runs['labelled'], **{'init_from': runs['pretrain_dir'], 'model.embed_dim': 32}
  )
  with pytest.raises(checkpoint.CheckpointError, match='different model shape') as error:
    train.train_and_evaluate(config, str(tmp_path / 'shape'))
  message = str(error.value)
  assert message.startswith(f'init_from {runs["pretrain_dir"]} step 600')
  assert (
    "params['blocks']['attention']['qkv']['kernel']: "
    'checkpoint (2, 64, 3, 2, 32), model (2, 32, 3, 2, 16)' in message
  ), message
  config = classify_config(corpus_dir, runs['labelled'], **{'init_from': str(tmp_path / 'nothing')})
  with pytest.raises(checkpoint.CheckpointError, match='no checkpoint in'):
    train.train_and_evaluate(config, str(tmp_path / 'missing'))
  config = classify_config(
    corpus_dir,
    runs['labelled'],
    **{
      'init_from': runs['pretrain_dir'],
      'finetune.mode': 'lora',
      'finetune.lora_targets': 'no_such_parameter',
    },
  )
  with pytest.raises(ValueError, match='matches no pre-trained matrix'):
    train.train_and_evaluate(config, str(tmp_path / 'targets'))
  config = mlm_config(corpus_dir, **{'init_from': runs['pretrain_dir'], 'finetune.mode': 'frozen'})
  with pytest.raises(ValueError, match='trains only new parameters'):
    train.train_and_evaluate(config, str(tmp_path / 'frozen_lm'))


@pytest.mark.parametrize(
  'overrides, message',
  [
    ({'task': 'mlm'}, "needs model.family='encoder'"),
    ({'model.family': 'encoder'}, 'cannot predict the next token'),
    ({'task': 'mlm', 'model.family': 'encoder', 'data.layout': 'stream'}, "not 'stream'"),
    ({'task': 'translate'}, 'task must be one of lm, mlm, classify'),
  ],
)
def test_task_and_family_must_fit(overrides, message, corpus_dir, tmp_path):
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(tiny_config(corpus_dir, **overrides), str(tmp_path / 'run'))
