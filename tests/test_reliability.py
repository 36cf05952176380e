"""Reliability: plain-Orbax restore anywhere, resume past damaged steps, storage
errors told apart from damage, one trainer per workdir, a full disk, bounded hangs."""

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from test_launch import train_command
from test_launch import wait_for

from conftest import REPO
from conftest import small_tmpfs
from conftest import tiny_config
from lmjax import checkpoint
from lmjax import locks
from lmjax import storage
from lmjax import train

STEPS = dict(
  **{
    'train.num_steps': 20,
    'checkpoint.every': 10,
    'train.eval_every': 0,
    'train.log_every': 10,
    'sample.max_new_tokens': 0,
    'train.final_eval_batches': 2,
  }
)


@pytest.fixture(scope='module')
def run_dir(corpus_dir, tmp_path_factory):
  """A tiny run trained on 8 devices, with checkpoints at steps 10 and 20."""
  workdir = tmp_path_factory.mktemp('reliability') / 'run'
  train.train_and_evaluate(tiny_config(corpus_dir, **STEPS), str(workdir))
  return workdir


def copy_of(run_dir, tmp_path) -> pathlib.Path:
  target = tmp_path / 'copy'
  shutil.copytree(run_dir, target)
  return target


def evaluate_command(*args, prefix=(), timeout=300):
  return subprocess.run(
    [*prefix, sys.executable, '-m', 'lmjax.evaluate', *map(str, args)],
    capture_output=True,
    text=True,
    timeout=timeout,
    cwd=REPO,
  )


def error_lines(stderr: str) -> list[str]:
  return [line for line in stderr.splitlines() if line.startswith('error:')]


def data_files(directory: pathlib.Path) -> list[pathlib.Path]:
  """Every file of the step's array data (OCDBT's `d/` directories). All of them:
  which file holds the parameters, and which the optimizer state, varies from run
  to run with the order of Orbax's asynchronous writes."""
  files = [p for p in directory.rglob('*') if p.is_file() and p.parent.name == 'd']
  assert files, f'no array data under {directory}'
  return files


def readme_restore_snippet() -> str:
  text = (REPO / 'README.md').read_text()
  section = text[text.index('## Checkpoints') :]
  return re.search(r'```python\n(.*?)```', section, re.S).group(1)


def test_the_readmes_plain_orbax_restore_works_on_one_device(run_dir):
  # The checkpoint was written from 8 devices; the README's snippet runs, as it
  # stands, in a fresh process that has one.
  snippet = readme_restore_snippet()
  assert 'import orbax.checkpoint as ocp' in snippet and 'lmjax' not in snippet
  path = str(run_dir / 'checkpoints' / '20' / 'state')
  program = snippet.replace('runs/default/checkpoints/1200/state', path) + textwrap.dedent("""
      import jax, json
      print(json.dumps({'devices': jax.device_count(),
                        'sums': {jax.tree_util.keystr(k): float(abs(v).sum())
                                 for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}}))
      """)
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=1'}
  result = subprocess.run(
    [sys.executable, '-c', program], capture_output=True, text=True, timeout=120, env=env
  )
  assert result.returncode == 0, result.stderr[-2000:]
  restored = json.loads(result.stdout.strip().splitlines()[-1])
  assert restored['devices'] == 1
  import jax

  manager = checkpoint.manager(str(run_dir), read_only=True)
  saved = checkpoint.restore_params(manager, 20, abstract_params_of(run_dir))
  expected = {
    jax.tree_util.keystr(k): float(np.abs(np.asarray(v)).sum())
    for k, v in jax.tree_util.tree_flatten_with_path(saved)[0]
  }
  assert restored['sums'].keys() == expected.keys() and len(expected) > 10
  np.testing.assert_allclose(
    [restored['sums'][k] for k in expected], [expected[k] for k in expected], rtol=1e-6
  )


def abstract_params_of(run_dir):
  """The run's parameters as lmjax restores them (onto this process's 8 devices)."""
  import ml_collections

  from lmjax import sharding
  from lmjax import tasks
  from lmjax import train_state

  checkpoints = checkpoint.manager(str(run_dir), read_only=True)
  config, record, _ = checkpoint.read_run(checkpoints, 20)
  mesh = sharding.make_mesh(ml_collections.ConfigDict({'data': -1, 'fsdp': 1, 'tensor': 1}))
  model = tasks.get(config.task).build_model(config, record)
  return train_state.abstract_params(model, config.data.seq_len, mesh)


def test_resume_falls_back_past_a_damaged_newest_step_and_keeps_it(
  run_dir, corpus_dir, tmp_path, capsys
):
  workdir = copy_of(run_dir, tmp_path)
  state = workdir / 'checkpoints' / '20' / 'state'
  victims = [p.relative_to(state) for p in data_files(state)]
  for victim in victims:
    with open(state / victim, 'r+b') as f:
      f.truncate(16)
  result = train.train_and_evaluate(
    tiny_config(corpus_dir, **{**STEPS, 'train.num_steps': 30}), str(workdir)
  )
  out = capsys.readouterr().out
  assert 'checkpoint step 20 at ' in out and 'damaged' in out
  assert 'resumed from checkpoint step 10' in out
  warnings = [line for line in out.splitlines() if line.startswith('warning:')]
  assert 1 <= len(warnings) <= 3 and all(len(line) < 600 for line in warnings), warnings
  assert 'tensorstore_spec' not in out
  # The damaged step is kept aside, byte for byte; the run saved 20 and 30 anew.
  kept = workdir / checkpoint.DAMAGED / '20'
  assert [(kept / 'state' / victim).stat().st_size for victim in victims] == [16] * len(victims)
  assert sorted(checkpoint.manager(str(workdir), read_only=True).all_steps()) == [10, 20, 30]
  assert np.isfinite(result['loss'])


@pytest.mark.slow
def test_a_damaged_step_named_on_the_command_line_is_a_short_error(run_dir, tmp_path):
  workdir = copy_of(run_dir, tmp_path)
  for victim in data_files(workdir / 'checkpoints' / '20' / 'state'):
    with open(victim, 'r+b') as f:
      f.truncate(16)
  result = evaluate_command('--workdir', workdir, '--step', 20, '--eval_batches', 1)
  assert result.returncode == 1
  [line] = error_lines(result.stderr)
  assert f'checkpoint step 20 at {workdir}' in line and 'damaged' in line
  assert len(line) < 600 and 'tensorstore_spec' not in result.stderr


@pytest.mark.slow
def test_an_unreadable_file_is_retried_then_fails_without_falling_back(run_dir, tmp_path):
  workdir = copy_of(run_dir, tmp_path)
  for victim in data_files(workdir / 'checkpoints' / '20' / 'state'):
    victim.chmod(0)
  # Root reads any file; without the capability to override permissions it cannot.
  unprivileged = ['setpriv', '--bounding-set', '-dac_override,-dac_read_search']
  start = time.monotonic()
  result = evaluate_command('--workdir', workdir, '--eval_batches', 1, prefix=unprivileged)
  assert result.returncode == 1, result.stderr[-2000:]
  [line] = error_lines(result.stderr)
  assert 'checkpoint step 20' in line and f'failed {checkpoint.IO_ATTEMPTS} times' in line
  assert 'Permission denied' in line or 'PERMISSION_DENIED' in line
  assert 'falling back' not in result.stderr and 'step 10' not in result.stderr
  assert time.monotonic() - start > checkpoint.RETRY_DELAY_S * (
    2 ** (checkpoint.IO_ATTEMPTS - 1) - 1
  )
  assert len(line) < 600


@pytest.mark.slow
def test_a_step_directory_replaced_by_a_dangling_link_is_skipped(run_dir, tmp_path):
  workdir = copy_of(run_dir, tmp_path)
  step_dir = workdir / 'checkpoints' / '20'
  shutil.rmtree(step_dir)
  step_dir.symlink_to(tmp_path / 'gone')
  result = evaluate_command('--workdir', workdir, '--eval_batches', 1)
  assert result.returncode == 0, result.stderr[-2000:]
  assert json.loads(result.stdout)['step'] == 10


def test_storage_errors_and_damage_are_told_apart():
  assert storage.is_io_failure(PermissionError(13, 'Permission denied'))
  assert storage.is_io_failure(ValueError('PERMISSION_DENIED: Error opening file'))
  assert storage.is_io_failure(ValueError('DEADLINE_EXCEEDED: read timed out'))
  assert not storage.is_io_failure(FileNotFoundError(2, 'No such file'))
  assert not storage.is_io_failure(ValueError('DATA_LOSS: Error reading local file'))
  assert storage.is_disk_full(OSError(28, 'No space left on device'))
  assert storage.is_disk_full(ValueError('RESOURCE_EXHAUSTED: Error writing "x/0"'))
  spec = 'x' * 5000
  short = storage.brief(ValueError(f"NOT_FOUND: missing [tensorstore_spec='{spec}']"))
  assert short == 'ValueError: NOT_FOUND: missing'


# ----------------------------------------------------------------------------
# One trainer per workdir.


@pytest.mark.slow
def test_a_second_trainer_is_refused_and_a_killed_ones_lock_is_taken(corpus_dir, tmp_path):
  workdir, log = tmp_path / 'run', tmp_path / 'first.txt'
  long_run = (
    '--config.train.num_steps=100000',
    '--config.checkpoint.every=50',
    '--config.train.eval_every=0',
    '--config.sample.max_new_tokens=0',
  )
  with open(log, 'w') as out:
    first = subprocess.Popen(
      train_command(corpus_dir, workdir, *long_run), stdout=out, stderr=subprocess.STDOUT, cwd=REPO
    )
    try:
      wait_for(log, 'compiled and ran the first train step', first)
      second = subprocess.run(
        train_command(corpus_dir, workdir, *long_run),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
      )
      assert second.returncode == 1
      [line] = error_lines(second.stderr)
      assert f'in use by another training run: process {first.pid} on host' in line
      assert first.poll() is None  # the first run goes on
      wait_for(log, 'step 50/', first)
      deadline = time.time() + 120  # the step-50 save is asynchronous: wait for its commit
      while not (workdir / 'checkpoints' / '50').is_dir() and time.time() < deadline:
        time.sleep(0.1)
    finally:
      first.send_signal(signal.SIGKILL)
      first.wait()
  # The killed run's lock file is still there; its lock went with the process.
  assert json.loads((workdir / 'lock').read_text())['pid'] == first.pid
  resumed = subprocess.run(
    train_command(corpus_dir, workdir, '--config.train.num_steps=60', *long_run[1:]),
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'resumed from checkpoint step' in resumed.stdout


def test_a_lock_on_an_object_store_is_refused_while_fresh_and_taken_when_stale():
  directory = f'ram://lmjax-lock-test-{os.getpid()}'
  holder = locks.Lock(directory, what='a test run', settle_s=0.0)
  holder.acquire()
  with pytest.raises(locks.LockError, match=f'process {os.getpid()} on host'):
    locks.Lock(directory, what='a test run', settle_s=0.0).acquire()
  holder._stop.set()  # the holder dies: its heartbeat stops
  time.sleep(0.3)
  taker = locks.Lock(directory, what='a test run', settle_s=0.0, stale_s=0.2)
  taker.acquire()  # stale: taken over
  taker.release()
  holder._record = None  # a dead holder releases nothing


# ----------------------------------------------------------------------------
# A full disk.


@pytest.mark.slow
def test_a_full_disk_is_one_clear_error_and_the_earlier_checkpoint_restores(corpus_dir, tmp_path):
  with small_tmpfs(tmp_path / 'small', '3m') as mount:
    workdir = mount / 'run'
    result = subprocess.run(
      train_command(
        corpus_dir,
        workdir,
        '--config.train.num_steps=200',
        '--config.checkpoint.every=10',
        '--config.checkpoint.keep=100',
        '--config.train.eval_every=0',
        '--config.sample.max_new_tokens=0',
      ),
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=300,
    )
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert 'Traceback' not in result.stderr, result.stderr[-3000:]
    [line] = error_lines(result.stderr)
    assert line.startswith('error: disk full') and str(workdir) in line, line
    steps = sorted(checkpoint.manager(str(workdir), read_only=True).all_steps())
    assert steps, 'no checkpoint fit at all: make the tmpfs larger'
    evaluated = evaluate_command('--workdir', workdir, '--eval_batches', 1)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert json.loads(evaluated.stdout)['step'] in steps


# ----------------------------------------------------------------------------
# Bounded hangs.

_STUCK = """
import os, sys, time
from lmjax import watchdog
guard = watchdog.Watchdog(timeout_s=float(sys.argv[1]), sigterm_grace_s=2.0).start()
import signal
signal.signal(signal.SIGTERM, lambda *a: None)  # a flag nobody reads, as in a stuck loop
with guard.phase('evaluation', 50):
  print('stuck', flush=True)
  while True:
    time.sleep(100)
"""


@pytest.mark.parametrize('how', ['phase timeout', 'sigterm'])
def test_a_stuck_phase_ends_the_process_with_its_step_and_phase(how):
  timeout = 3.0 if how == 'phase timeout' else 600.0
  process = subprocess.Popen(
    [sys.executable, '-c', _STUCK, str(timeout)],
    cwd=REPO,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  assert process.stdout.readline().strip() == 'stuck'
  start = time.monotonic()
  if how == 'sigterm':
    process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=60)
  assert process.returncode == watchdog_exit_code()
  assert time.monotonic() - start < 30
  [line] = error_lines(stderr)
  if how == 'sigterm':
    assert 'SIGTERM was not obeyed within 2s' in line and 'step 50, evaluation' in line
  else:
    assert 'evaluation at step 50 made no progress for 3s' in line


def watchdog_exit_code() -> int:
  from lmjax import watchdog

  return watchdog.HUNG_EXIT_CODE


@pytest.mark.slow
def test_a_simulated_pod_with_two_devices_per_process_evaluates_and_ends(tmp_path):
  # Before the fix, this run hung in its step-50 or final evaluation in most tries.
  workdir = tmp_path / 'pod'
  result = subprocess.run(
    [
      sys.executable,
      'launch/local_pod',
      '--processes',
      '2',
      '--devices_per_process',
      '2',
      '--',
      '--config',
      'configs/default.py',
      '--workdir',
      str(workdir),
      '--config.train.num_steps=100',
      '--config.train.eval_every=50',
      '--config.train.eval_batches=4',
      '--config.train.final_eval_batches=8',
      '--config.sample.max_new_tokens=20',
      '--config.train.phase_timeout_s=120',
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=400,
    env={**os.environ, 'PYTHON': sys.executable},
  )
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert 'step 50: eval loss' in result.stdout and 'final eval' in result.stdout
  steps = sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())
  assert steps[-1] == 100  # both processes took part in the last save
