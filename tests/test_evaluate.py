"""`lmjax.evaluate`: restore any checkpoint anywhere (parameters only), report JSON; keep
the best step; damaged and missing checkpoints say which step and path."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from conftest import tiny_config
from lmjax import checkpoint
from lmjax import evaluate
from lmjax import metrics
from lmjax import train

pytestmark = pytest.mark.slow


@pytest.fixture(scope='module')
def fsdp_run(corpus_dir, tmp_path_factory):
  """40 steps on 8 devices with fsdp=4 (data=2), checkpoints at 20 and 40."""
  workdir = str(tmp_path_factory.mktemp('fsdp'))
  config = tiny_config(
    corpus_dir,
    **{
      'mesh.data': 2,
      'mesh.fsdp': 4,
      'train.num_steps': 40,
      'train.eval_every': 20,
      'checkpoint.every': 20,
      'sample.max_new_tokens': 0,
    },
  )
  result = train.train_and_evaluate(config, workdir)
  return workdir, result


def evaluate_command(*args, devices=1):
  env = {**os.environ, 'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}'}
  return subprocess.run(
    [sys.executable, '-m', 'lmjax.evaluate', *map(str, args)],
    capture_output=True,
    text=True,
    timeout=300,
    cwd=REPO,
    env=env,
  )


def test_fsdp_checkpoint_evaluates_in_a_fresh_single_device_process(fsdp_run, tmp_path):
  workdir, logged = fsdp_run
  output = tmp_path / 'eval.json'
  result = evaluate_command('--workdir', workdir, '--eval_batches', 8, '--output', output)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(output.read_text())
  assert report == json.loads(result.stdout)
  assert report['step'] == 40 and report['split'] == 'validation'
  np.testing.assert_allclose(report['loss'], logged['loss'], rtol=1e-5)  # final eval, 8 batches
  for key in ('perplexity', 'bits_per_byte', 'accuracy', 'tokens', 'bytes'):
    np.testing.assert_allclose(report[key], logged[key], rtol=1e-5)
  assert report['tokens'] == 8 * 32 * 32


def test_whole_split_other_split_and_data_overrides(fsdp_run, corpus_dir):
  workdir, _ = fsdp_run
  whole = json.loads(evaluate_command('--workdir', workdir).stdout)
  assert whole['tokens'] == 60_000  # part3.txt: every target token once
  other = evaluate_command(
    '--workdir',
    workdir,
    '--split',
    'train',
    '--step',
    20,
    f'--data.files={corpus_dir}/part0.txt',
    '--data.validation_files=',
  )
  assert other.returncode == 0, other.stderr[-3000:]
  report = json.loads(other.stdout)
  assert report['step'] == 20 and report['split'] == 'train'
  assert report['tokens'] < 60_000  # part0 minus its carved-out validation share
  bad = evaluate_command('--workdir', workdir, '--data.file=x')
  assert bad.returncode != 0 and "unknown config key 'file'" in bad.stderr


def test_best_step_is_kept_apart(fsdp_run):
  workdir, _ = fsdp_run
  evals = {r['step']: r['eval/loss'] for r in metrics.read_metrics(workdir) if 'eval/loss' in r}
  assert sorted(evals) == [20]  # periodic evaluations (40 is the last step: final eval)
  best = evaluate_command('--workdir', workdir, '--step', 'best', '--eval_batches', 4)
  assert best.returncode == 0, best.stderr[-3000:]
  assert json.loads(best.stdout)['step'] == 20
  np.testing.assert_allclose(json.loads(best.stdout)['loss'], evals[20], rtol=1e-5)


def test_missing_and_damaged_checkpoints_name_the_step_and_path(fsdp_run, tmp_path):
  workdir, _ = fsdp_run
  empty = evaluate_command('--workdir', tmp_path / 'nothing')
  assert empty.returncode != 0 and 'no checkpoint in' in empty.stderr
  absent = evaluate_command('--workdir', workdir, '--step', 30)
  assert absent.returncode != 0
  assert 'no checkpoint for step 30' in absent.stderr and 'steps present: [20, 40]' in absent.stderr
  # Damage step 40: its state metadata is deleted.
  damaged = str(tmp_path / 'damaged')
  shutil.copytree(workdir, damaged)
  os.remove(os.path.join(checkpoint.directory(damaged), '40', 'state', '_METADATA'))
  named = evaluate_command('--workdir', damaged, '--step', 40)
  assert named.returncode != 0
  assert 'checkpoint step 40 at ' in named.stderr and 'damaged' in named.stderr
  latest = evaluate_command('--workdir', damaged, '--eval_batches', 2)
  assert latest.returncode == 0, latest.stderr[-3000:]
  assert json.loads(latest.stdout)['step'] == 20
  assert 'using step 20, the newest intact checkpoint' in latest.stderr
  # Truncate step 20's array data too: nothing intact is left.
  for root, _, files in os.walk(os.path.join(checkpoint.directory(damaged), '20', 'state')):
    for name in files:
      if 'ocdbt' in root or name.startswith('d'):
        with open(os.path.join(root, name), 'r+b') as f:
          f.truncate(16)
  none_left = evaluate_command('--workdir', damaged, '--eval_batches', 2)
  assert none_left.returncode != 0 and 'checkpoint step 20 at' in none_left.stderr


def test_restore_for_inference_reads_parameters_only(fsdp_run):
  workdir, _ = fsdp_run
  restored = evaluate.restore_for_inference(workdir, '20')
  config, tokenizer, params, step, mesh = (
    restored.config,
    restored.tokenizer,
    restored.params,
    restored.step,
    restored.mesh,
  )
  assert step == 20 and tokenizer.kind == 'chars' and config.mesh.fsdp == 4
  assert set(params) >= {'embed', 'blocks', 'final_norm'}
  kernel = params['blocks']['attention']['qkv']['kernel']
  assert kernel.sharding.mesh.shape == mesh.shape  # placed on this process' mesh
