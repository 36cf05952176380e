"""End to end: train, checkpoint, resume, evaluate, sample; and the errors around them."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO
from conftest import tiny_config
from lmjax import checkpoint
from lmjax import metrics
from lmjax import train

pytestmark = pytest.mark.slow


@pytest.fixture(scope='module')
def runs(corpus_dir, tmp_path_factory):
  """One uninterrupted 100-step run and one stopped at step 50 and resumed."""
  base = tmp_path_factory.mktemp('runs')
  whole_dir, split_dir = str(base / 'whole'), str(base / 'split')
  whole = train.train_and_evaluate(tiny_config(corpus_dir), whole_dir)
  train.train_and_evaluate(tiny_config(corpus_dir, **{'train.stop_at': 50}), split_dir)
  split = train.train_and_evaluate(tiny_config(corpus_dir), split_dir)
  return {'whole_dir': whole_dir, 'split_dir': split_dir, 'whole': whole, 'split': split}


def train_losses(workdir):
  return {r['step']: r['train/loss'] for r in metrics.read_metrics(workdir) if 'train/loss' in r}


def test_training_learns_below_the_unigram_baseline(runs):
  result = runs['whole']
  assert result['loss'] < result['unigram_entropy'] - 0.3
  assert result['tokens'] == 8 * 32 * 32  # final_eval_batches full batches
  assert 0 < result['bits_per_byte'] < 8 and 0 < result['accuracy'] < 1


def test_resumed_run_continues_the_same_loss_curve(runs):
  whole, split = train_losses(runs['whole_dir']), train_losses(runs['split_dir'])
  assert sorted(whole) == sorted(split) == list(range(10, 101, 10))  # appended across runs
  for step in (60, 80, 100):
    np.testing.assert_allclose(split[step], whole[step], rtol=1e-6)
  for key in ('loss', 'accuracy', 'bits_per_byte'):
    np.testing.assert_allclose(runs['split'][key], runs['whole'][key], rtol=1e-6)


def test_workdir_holds_config_metrics_tensorboard_and_checkpoints(runs):
  import os

  workdir = runs['whole_dir']
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['model']['embed_dim'] == 64
  records = metrics.read_metrics(workdir)
  assert any('eval/loss' in r and r['step'] == 50 for r in records)
  assert any('final_eval/bits_per_byte' in r for r in records)
  # TensorBoard holds every scalar of metrics.jsonl, at its step.
  from test_metrics import tensorboard_scalars

  logged = tensorboard_scalars(os.path.join(workdir, 'tensorboard'))
  expected = {
    (k, r['step']): round(float(v), 6) for r in records for k, v in r.items() if k != 'step'
  }
  assert ('train/loss', 100) in expected and ('eval/loss', 50) in expected
  for key, value in expected.items():
    assert logged[key] == pytest.approx(value, rel=1e-5), key
  manager = checkpoint.manager(workdir, read_only=True)
  assert sorted(manager.all_steps()) == [50, 100]
  saved = checkpoint.read_json(manager, 100, 'config')
  assert saved['model']['num_layers'] == 2
  assert checkpoint.read_json(manager, 100, 'tokenizer')['kind'] == 'chars'


def test_finished_run_started_again_only_evaluates(runs, corpus_dir):
  again = train.train_and_evaluate(tiny_config(corpus_dir), runs['whole_dir'])
  np.testing.assert_allclose(again['loss'], runs['whole']['loss'], rtol=1e-6)


def test_sample_command_restores_and_generates(runs):
  command = [
    sys.executable,
    '-m',
    'lmjax.sample',
    '--workdir',
    runs['whole_dir'],
    '--prompt',
    'ROMEO:',
    '--max_new_tokens',
    '30',
    '--seed',
    '3',
  ]
  first = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO)
  assert first.returncode == 0, first.stderr[-2000:]
  assert '--- sample 0 (step 100) ---\nROMEO:' in first.stdout
  second = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO)
  assert second.stdout == first.stdout  # Deterministic for a seed.
  bad = subprocess.run(
    command[:-6] + ['--prompt', 'ROMEO€'], capture_output=True, text=True, timeout=300, cwd=REPO
  )
  assert bad.returncode != 0 and "outside the vocabulary: ['€']" in bad.stderr


def test_sample_without_checkpoint_says_so(tmp_path):
  result = subprocess.run(
    [sys.executable, '-m', 'lmjax.sample', '--workdir', str(tmp_path)],
    capture_output=True,
    text=True,
    timeout=300,
    cwd=REPO,
  )
  assert result.returncode != 0 and 'no checkpoint in' in result.stderr


def test_resuming_with_another_model_shape_names_the_differences(runs, corpus_dir, tmp_path):
  import shutil

  workdir = str(tmp_path / 'copy')
  shutil.copytree(runs['whole_dir'], workdir)
  wider = tiny_config(corpus_dir, **{'model.embed_dim': 96, 'train.num_steps': 150})
  with pytest.raises(checkpoint.CheckpointError) as error:
    train.train_and_evaluate(wider, workdir)
  message = str(error.value)
  assert 'checkpoint step 100' in message and 'different model shape' in message
  assert (
    "params['blocks']['attention']['qkv']['kernel']: checkpoint (2, 64, 3, 2, 32), "
    'model (2, 96, 3, 2, 48)'
  ) in message
  # The good checkpoint is untouched.
  assert sorted(checkpoint.manager(workdir, read_only=True).all_steps()) == [50, 100]


def test_diverging_run_stops_loudly_without_saving_a_bad_checkpoint(corpus_dir, tmp_path):
  diverging = tiny_config(
    corpus_dir,
    **{
      'optimizer.name': 'sgd',
      'optimizer.learning_rate': 1e30,
      'optimizer.grad_clip': 0.0,
      'optimizer.momentum': 0.0,
      'optimizer.weight_decay': 0.0,
      'train.eval_every': 0,
      'checkpoint.every': 10,
      'train.log_every': 10,
    },
  )
  with pytest.raises(FloatingPointError, match='not finite at step'):
    train.train_and_evaluate(diverging, str(tmp_path))
  assert checkpoint.manager(str(tmp_path), read_only=True).all_steps() == []


def test_launch_local_runs_the_train_entry_point(corpus_dir, tmp_path):
  env = {**__import__('os').environ, 'PYTHON': sys.executable}
  workdir = tmp_path / 'x'
  result = subprocess.run(
    [
      'bash',
      str(REPO / 'launch' / 'local'),
      '--cpu',
      '--config',
      f'{REPO}/tests/tiny_run_config.py:{corpus_dir}',
      '--workdir',
      str(workdir),
      '--config.train.num_steps=20',
      '--config.train.eval_every=0',
      '--config.sample.max_new_tokens=0',
    ],
    capture_output=True,
    text=True,
    timeout=300,
    cwd=REPO,
    env=env,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'final eval' in result.stdout
  assert sorted(checkpoint.manager(str(workdir), read_only=True).all_steps()) == [20]
  assert [r['step'] for r in metrics.read_metrics(str(workdir)) if 'train/loss' in r] == [10, 20]
  mistyped = subprocess.run(
    [
      'bash',
      str(REPO / 'launch' / 'local'),
      '--cpu',
      '--config',
      str(REPO / 'configs' / 'default.py'),
      '--workdir',
      str(tmp_path / 'y'),
      '--config.train.num_step=1',
    ],
    capture_output=True,
    text=True,
    timeout=120,
    cwd=REPO,
    env=env,
  )
  assert mistyped.returncode != 0 and "unknown config key 'train.num_step'" in mistyped.stderr


def test_resuming_with_another_tokenizer_names_both(runs, corpus_dir, tmp_path):
  import shutil

  from lmjax.data import tokenizers

  workdir = tmp_path / 'copy'
  shutil.copytree(runs['whole_dir'], workdir)
  saved = json.loads((workdir / 'tokenizer.json').read_text())
  other = tokenizers.CharTokenizer(list(saved['chars'])[:-1])  # one character fewer
  (workdir / 'tokenizer.json').write_text(json.dumps(other.to_json()))
  with pytest.raises(checkpoint.CheckpointError) as error:
    train.train_and_evaluate(tiny_config(corpus_dir, **{'train.num_steps': 150}), str(workdir))
  message = str(error.value)
  assert 'checkpoint step 100' in message and 'tokenizer' in message
  assert str(other.vocab_size) in message and str(other.vocab_size + 1) in message


def test_resumed_run_ends_with_bitwise_identical_parameters(runs):
  whole, split = params_at(runs['whole_dir'], 100), params_at(runs['split_dir'], 100)
  flat_whole, flat_split = jax.tree.leaves(whole), jax.tree.leaves(split)
  assert len(flat_whole) == len(flat_split) > 10
  for a, b in zip(flat_whole, flat_split):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def params_at(workdir, step):
  """Parameters of a checkpoint, restored with plain Orbax."""
  import orbax.checkpoint as ocp

  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore(f'{checkpoint.directory(workdir)}/{step}/state')['params']


def test_packed_paragraphs_train_and_resume_bitwise(corpus_dir, tmp_path):
  """Paragraphs as documents, packed with attention masks: learns, and a run
  stopped at step 20 and resumed ends bitwise where an uninterrupted one does."""
  overrides = {
    'data.documents': 'paragraphs',
    'data.layout': 'packed',
    'data.seq_len': 64,
    'train.batch_size': 16,
    'train.num_steps': 40,
    'train.eval_every': 20,
    'checkpoint.every': 20,
    'sample.max_new_tokens': 0,
  }
  whole = train.train_and_evaluate(tiny_config(corpus_dir, **overrides), str(tmp_path / 'w'))
  train.train_and_evaluate(
    tiny_config(corpus_dir, **overrides, **{'train.stop_at': 20}), str(tmp_path / 's')
  )
  split = train.train_and_evaluate(tiny_config(corpus_dir, **overrides), str(tmp_path / 's'))
  assert whole['loss'] < whole['unigram_entropy'] - 0.05  # 40 small steps: it starts to learn
  assert split['loss'] == whole['loss']
  for a, b in zip(
    jax.tree.leaves(params_at(str(tmp_path / 'w'), 40)),
    jax.tree.leaves(params_at(str(tmp_path / 's'), 40)),
  ):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_compiled_programs_persist_in_the_compilation_cache(corpus_dir, tmp_path):
  cache = tmp_path / 'xla'
  command = [
    sys.executable,
    '-m',
    'lmjax.train',
    '--config',
    f'{REPO}/tests/tiny_run_config.py:{corpus_dir}',
    '--workdir',
    str(tmp_path / 'run'),
    f'--config.compilation_cache_dir={cache}',
    '--config.train.num_steps=2',
    '--config.train.eval_every=0',
    '--config.sample.max_new_tokens=0',
  ]
  result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO)
  assert result.returncode == 0, result.stderr[-3000:]
  entries = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
  assert len(entries) >= 2  # the train step and the eval step at least
  # A second run (a new workdir, the same shapes) finds every program in the cache:
  # it compiles nothing, so it writes no entry, new or rewritten.
  command[command.index('--workdir') + 1] = str(tmp_path / 'again')
  again = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO)
  assert again.returncode == 0, again.stderr[-3000:]
  assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == entries
