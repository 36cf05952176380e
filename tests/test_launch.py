"""Launchers and preemption: TPU dry runs (golden files), a local pod of 2
processes, SIGTERM -> checkpoint and exit 75 -> resume, kill -9 during saves."""

import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO

GOLDEN = REPO / 'tests' / 'golden'


def dry_runs(name, accelerator, config, *create_flags):
  """The same command lines as tests/golden/make_tpu_dry_runs.sh produces."""
  env = {**os.environ, 'TFDS_DATA_DIR': 'gs://my-bucket/tensorflow_datasets'}
  out = []
  for command in ('create', 'setup', 'run', 'status', 'stop', 'delete'):
    flags = list(create_flags) if command == 'create' else []
    result = subprocess.run(
      [
        sys.executable,
        'launch/tpu.py',
        command,
        '--name',
        name,
        '--zone',
        'us-central2-b',
        '--project',
        'my-project',
        '--accelerator',
        accelerator,
        *flags,
        '--dry_run',
        '--',
        '--config',
        config,
        '--workdir',
        f'gs://my-bucket/runs/{name}',
        '--config.train.num_steps=20000',
      ],
      capture_output=True,
      text=True,
      cwd=REPO,
      env=env,
      timeout=60,
    )
    assert result.returncode == 0, result.stderr
    out.append(result.stdout)
  return ''.join(out)


@pytest.mark.parametrize(
  'name,accelerator,config,flags,golden',
  [
    ('lm-v4-8', 'v4-8', 'configs/tpu/v4_8.py', (), 'tpu_v4_8.txt'),
    ('lm-v4-32', 'v4-32', 'configs/tpu/v4_32.py', ('--spot',), 'tpu_v4_32.txt'),
  ],
)
def test_tpu_dry_runs_match_the_golden_files(name, accelerator, config, flags, golden):
  text = dry_runs(name, accelerator, config, *flags)
  assert text == (GOLDEN / golden).read_text()
  assert '--worker=all' in text and 'LMJAX_DISTRIBUTED=auto' in text


def launch(*args, env=None):
  return subprocess.run(
    [sys.executable, 'launch/tpu.py', *args],
    capture_output=True,
    text=True,
    cwd=REPO,
    env=env,
    timeout=60,
  )


def test_a_tpu_sweep_starts_one_worker_per_slice_on_the_shared_storage():
  sweep = ['--sweep', 'configs/sweeps/shakespeare_char.py', '--dir', 'sweeps/sc']
  storage = ['--storage', 'postgresql://lm@10.0.0.2/sweeps']
  common = ['sweep', '--name', 'lm', '--zone', 'us-central2-b', '--dry_run']
  env = {**os.environ, 'TFDS_DATA_DIR': 'gs://my-bucket/tensorflow_datasets'}
  done = launch(*common, '--slices', '3', '--', *sweep, *storage, env=env)
  assert done.returncode == 0, done.stderr
  lines = done.stdout.splitlines()
  assert len(lines) == 3
  for i, line in enumerate(lines):
    assert line.startswith(
      f'gcloud compute tpus tpu-vm ssh lm-{i} --zone=us-central2-b --worker=0 '
    )
    assert (
      'TFDS_DATA_DIR=gs://my-bucket/tensorflow_datasets nohup python3 -m lmjax.sweep '
      '--sweep configs/sweeps/shakespeare_char.py --dir sweeps/sc '
      '--storage postgresql://lm@10.0.0.2/sweeps > ~/lmjax_sweep.log'
    ) in line
  no_storage = launch(*common, '--', *sweep)
  assert no_storage.returncode != 0 and 'give --storage URL' in no_storage.stderr
  pod = launch(*common, '--accelerator', 'v4-32', '--', *sweep, *storage)
  assert pod.returncode != 0 and 'v4-32 has several hosts' in pod.stderr


def test_tpu_configs_load():
  from lmjax import config as config_lib

  for name in ('v4_8', 'v4_32', 'v5e_16'):
    config = config_lib.load_config_file(str(REPO / 'configs' / 'tpu' / f'{name}.py'))
    assert config.data.data_dir.startswith('gs://')


def train_command(corpus_dir, workdir, *overrides):
  return [
    sys.executable,
    '-m',
    'lmjax.train',
    '--config',
    f'{REPO}/tests/tiny_run_config.py:{corpus_dir}',
    '--workdir',
    str(workdir),
    *overrides,
  ]


def wait_for(path: pathlib.Path, text: str, process, timeout=240):
  start = time.monotonic()
  while time.monotonic() - start < timeout:
    if path.exists() and text in path.read_text():
      return
    if process.poll() is not None:
      pytest.fail(
        f'process ended ({process.returncode}) before {text!r}:\n'
        f'{path.read_text()[-3000:] if path.exists() else ""}'
      )
    time.sleep(0.2)
  pytest.fail(f'{text!r} did not appear in {path} within {timeout}s')


def checkpoint_steps(workdir):
  directory = pathlib.Path(workdir) / 'checkpoints'
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


@pytest.mark.slow
def test_sigterm_saves_the_step_reached_exits_75_and_resumes(corpus_dir, tmp_path):
  log = tmp_path / 'log.txt'
  long_run = (
    '--config.train.num_steps=100000',
    '--config.checkpoint.every=100000',
    '--config.train.eval_every=0',
    '--config.sample.max_new_tokens=0',
  )
  with open(log, 'w') as out:
    process = subprocess.Popen(
      train_command(corpus_dir, tmp_path / 'run', *long_run),
      stdout=out,
      stderr=subprocess.STDOUT,
      cwd=REPO,
    )
    wait_for(log, 'compiled and ran the first train step', process)
    time.sleep(1.0)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 75, log.read_text()[-3000:]
  steps = checkpoint_steps(tmp_path / 'run')
  assert len(steps) == 1 and 1 <= steps[0] < 100000
  assert f'saved a checkpoint at step {steps[0]}' in log.read_text()
  resumed = subprocess.run(
    train_command(
      corpus_dir, tmp_path / 'run', *long_run[1:], f'--config.train.num_steps={steps[0] + 5}'
    ),
    capture_output=True,
    text=True,
    cwd=REPO,
    timeout=300,
  )
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f'resumed from checkpoint step {steps[0]}' in resumed.stdout


@pytest.mark.slow
def test_kill_9_during_async_saves_resumes_from_a_complete_step(corpus_dir, tmp_path):
  log = tmp_path / 'log.txt'
  every_step = (
    '--config.train.num_steps=100000',
    '--config.checkpoint.every=1',
    '--config.checkpoint.keep=2',
    '--config.train.eval_every=0',
    '--config.sample.max_new_tokens=0',
  )
  with open(log, 'w') as out:
    process = subprocess.Popen(
      train_command(corpus_dir, tmp_path / 'run', *every_step),
      stdout=out,
      stderr=subprocess.STDOUT,
      cwd=REPO,
    )
    wait_for(log, 'compiled and ran the first train step', process)
    while len(checkpoint_steps(tmp_path / 'run')) < 2:  # saves are under way
      time.sleep(0.05)
    time.sleep(0.37)
    process.kill()  # SIGKILL, mid-save with high probability (a save every step)
    process.wait()
  resumed = subprocess.run(
    train_command(
      corpus_dir,
      tmp_path / 'run',
      *every_step[2:],
      '--config.train.num_steps=100000',
      '--config.train.stop_at=1',
    ),
    capture_output=True,
    text=True,
    cwd=REPO,
    timeout=300,
  )
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'resumed from checkpoint step' in resumed.stdout


@pytest.mark.slow
def test_a_sigterm_to_one_process_of_a_local_pod_stops_both_at_one_step(corpus_dir, tmp_path):
  pod = [
    sys.executable,
    str(REPO / 'launch' / 'local_pod'),
    '--processes',
    '2',
    '--devices_per_process',
    '4',
    '--',
  ]
  # (A pod that trains to its end: tests/test_reliability.py's simulated pod.)
  # SIGTERM to one process of a running pod: both save at the same step and exit 75.
  log = tmp_path / 'b' / 'local_pod' / 'process_0.log'
  process = subprocess.Popen(
    pod
    + train_command(corpus_dir, tmp_path / 'b')[3:]
    + [
      '--config.train.num_steps=100000',
      '--config.checkpoint.every=100000',
      '--config.train.eval_every=0',
    ],
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
    cwd=REPO,
  )
  wait_for(log, 'compiled and ran the first train step', process)
  time.sleep(2.0)
  workers = subprocess.run(
    ['pgrep', '-f', f'lmjax.train.*{tmp_path / "b"}'], capture_output=True, text=True
  ).stdout.split()
  assert len(workers) == 2
  os.kill(int(workers[1]), signal.SIGTERM)
  assert process.wait(timeout=180) == 75
  steps = checkpoint_steps(tmp_path / 'b')
  assert len(steps) == 1 and steps[0] >= 1
  assert f'saved a checkpoint at step {steps[0]}' in log.read_text()  # process 0 logs
