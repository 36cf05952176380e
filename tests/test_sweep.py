"""lmjax.sweep: real Optuna studies of real train runs (configs/sweeps/tiny.py, a
tiny model of the default corpus): the budget, the best trial, pruning, kill -9
and restart, two workers on one study, and the bad-sweep errors."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO
from lmjax import locks
from lmjax import sweep as sweep_lib

TINY = 'configs/sweeps/tiny.py'
HOPELESS = 1e-6  # the tiny sweep's learning rate that learns nothing


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))  # the default corpus, built by the first trial


def environment():
  # Trials split the host themselves (lmjax.cpu_host), not into the tests' 8 devices.
  return {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}


def command(directory, data_dir, *args):
  return [
    sys.executable,
    '-m',
    'lmjax.sweep',
    '--sweep',
    TINY,
    '--dir',
    str(directory),
    f'--set=data.data_dir={data_dir}',
    *args,
  ]


def run_sweep(directory, data_dir, *args):
  done = subprocess.run(
    command(directory, data_dir, *args),
    capture_output=True,
    text=True,
    cwd=REPO,
    env=environment(),
    timeout=900,
  )
  assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
  return done.stdout


def results(directory):
  return json.loads((directory / 'results.json').read_text())


def final_loss(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    finals = [json.loads(line) for line in f if 'final_eval/loss' in line]
  return finals[-1]['final_eval/loss']


@pytest.fixture(scope='module')
def finished(tmp_path_factory, data_dir):
  directory = tmp_path_factory.mktemp('sweep')
  return directory, run_sweep(directory, data_dir)


@pytest.mark.slow
def test_the_tiny_sweep_completes_its_budget_with_the_default_storage(finished):
  directory, console = finished
  rows = results(directory)
  assert [row['number'] for row in rows] == [0, 1, 2, 3]  # the budget, no number twice
  assert (directory / 'study.journal').is_file()  # Optuna's journal file: no server
  for row in rows:
    assert row['state'] in ('complete', 'pruned')
    assert f'trial {row["number"]} started' in console
  assert 'best so far: trial' in console
  for name in ('objective_vs_params', 'validation_curves', 'parallel_coordinates'):
    assert (directory / f'{name}.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert (directory / 'results.csv').read_text().splitlines()[0].startswith('number,state,')


@pytest.mark.slow
def test_the_best_trial_is_what_its_metrics_say(finished):
  directory, console = finished
  complete = [row for row in results(directory) if row['state'] == 'complete']
  best = min(complete, key=lambda row: row['objective'])
  assert best['objective'] == final_loss(best['workdir'])
  assert best['steps'] == 120
  best_config = json.loads((directory / 'best_config.json').read_text())
  saved = json.loads((directory / 'trials' / str(best['number']) / 'config.json').read_text())
  assert best_config == saved
  assert best_config['optimizer']['learning_rate'] == best['params.optimizer.learning_rate']
  assert best_config['model']['num_layers'] == best['params.model.num_layers']
  assert f'best so far: trial {best["number"]}, {best["objective"]:.4f}' in console


@pytest.mark.slow
def test_the_hopeless_learning_rate_is_pruned_before_its_last_evaluation(finished):
  directory, _ = finished
  rows = results(directory)
  first_complete = min(row['number'] for row in rows if row['state'] == 'complete')
  hopeless = [
    row
    for row in rows
    if row['params.optimizer.learning_rate'] == HOPELESS and row['number'] > first_complete
  ]
  assert hopeless  # the seeded grid order puts some after a finished trial
  for row in hopeless:
    assert row['state'] == 'pruned' and row['steps'] == 40  # its first evaluation of 2
    assert (directory / 'trials' / str(row['number']) / 'checkpoints' / '40').is_dir()
    log = (directory / 'trials' / str(row['number']) / 'train.log').read_text()
    assert 'pruned by the sweep at step 40' in log


@pytest.mark.slow
def test_report_draws_the_outputs_again_from_the_study(finished, data_dir):
  directory, _ = finished
  before = results(directory)
  for name in ('results.json', 'results.csv', 'validation_curves.png', 'best_config.json'):
    (directory / name).unlink()
  summary = json.loads(run_sweep(directory, data_dir, '--report'))
  assert results(directory) == before
  assert (directory / 'validation_curves.png').is_file() and (
    directory / 'best_config.json'
  ).is_file()
  assert summary['trials'] == 4 and summary['best_value'] == min(
    row['objective'] for row in before if row['state'] == 'complete'
  )


@pytest.mark.slow
def test_kill_9_then_restart_resumes_the_running_trial_exactly(tmp_path, finished, data_dir):
  """The sweep is killed (SIGKILL) while trial 0 trains past its step-40 checkpoint;
  started again it resumes trial 0 from that checkpoint in the same directory and
  ends as the uninterrupted sweep's trial 0 did, to the last bit."""
  directory = tmp_path / 'sweep'
  process = subprocess.Popen(
    command(directory, data_dir, '--trials', '2'),
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
    cwd=REPO,
    env=environment(),
  )
  checkpoint = directory / 'trials' / '0' / 'checkpoints' / '40'
  deadline = time.time() + 300
  while not checkpoint.is_dir() and time.time() < deadline and process.poll() is None:
    time.sleep(0.2)
  assert checkpoint.is_dir(), 'trial 0 never wrote its step-40 checkpoint'
  os.kill(process.pid, signal.SIGKILL)
  process.wait()
  # The trial's train run died with its worker: its workdir lock is free again.
  lock = locks.Lock(str(directory / 'trials' / '0'), 'lock', 'a test', wait=True)
  lock.acquire()
  lock.release()
  console = run_sweep(directory, data_dir, '--trials', '2')
  assert 'trial 0 resumed' in console and 'trial 1 started' in console
  assert 'resumed from checkpoint step' in (directory / 'trials' / '0' / 'train.log').read_text()
  rows = results(directory)
  assert [row['number'] for row in rows] == [0, 1]
  uninterrupted = results(finished[0])[0]
  assert {k: v for k, v in rows[0].items() if k.startswith('params.')} == {
    k: v for k, v in uninterrupted.items() if k.startswith('params.')
  }  # the seeded grid gives trial 0 the same point
  assert rows[0]['state'] == 'complete' and rows[0]['objective'] == uninterrupted['objective']


@pytest.mark.slow
def test_two_workers_complete_disjoint_trials_of_one_study(tmp_path, data_dir):
  directory = tmp_path / 'sweep'
  console = run_sweep(directory, data_dir, '--trials', '2', '--workers', '2')
  rows = results(directory)
  assert [row['number'] for row in rows] == [0, 1]
  assert len({row['worker'] for row in rows}) == 2  # one trial each
  assert len({row['workdir'] for row in rows}) == 2
  assert all(row['state'] in ('complete', 'pruned') for row in rows)
  assert console.count('[worker ') >= 4  # each worker's start and end lines


def write_sweep(tmp_path, space: str, **fields) -> str:
  extra = ''.join(f'    {k}={v!r},\n' for k, v in fields.items())
  path = tmp_path / 'bad.py'
  path.write_text(
    'from lmjax import sweep\n\n\ndef get_sweep():\n'
    f"  return sweep.Sweep(\n    config='configs/default.py',\n    space={space},\n"
    f'    trials=2,\n{extra}  )\n'
  )
  return str(path)


def test_a_bad_sweep_is_a_clear_error_before_anything_runs(tmp_path):
  cases = [
    ("{'model.num_layer': sweep.Int(1, 2)}", {}, "unknown config key 'model.num_layer'"),
    ('{}', {}, 'the search space is empty'),
    ("{'model.num_layers': sweep.Int(4, 2)}", {}, 'low=4 must be below high=2'),
    ("{'model.dropout': sweep.Float(0.0, 0.3)}", {'sampler': 'grid'}, 'needs a Float with a step'),
    ("{'model.dropout': sweep.Float(0.0, 0.3)}", {'pruner': 'asha'}, "pruner='asha'"),
    ("{'model.dropout': sweep.Float(0.0, 0.3)}", {'objective': 'loss'}, "'eval/loss'"),
  ]
  for space, fields, message in cases:
    with pytest.raises(sweep_lib.SweepError, match=message):
      sweep_lib.load(write_sweep(tmp_path, space, **fields))
  with pytest.raises(sweep_lib.SweepError, match='valid keys there: .*num_layers'):
    sweep_lib.load(write_sweep(tmp_path, "{'model.num_layer': sweep.Int(1, 2)}"))
  directory = tmp_path / 'never'
  done = subprocess.run(
    [sys.executable, '-m', 'lmjax.sweep', '--sweep', TINY, '--dir', str(directory)]
    + ['--set=train.num_step=5'],
    capture_output=True,
    text=True,
    cwd=REPO,
    timeout=120,
  )
  assert done.returncode == 2 and "unknown config key 'train.num_step'" in done.stderr
  assert 'Traceback' not in done.stderr and not directory.exists()


@pytest.mark.slow
def test_a_trial_that_crashes_is_a_failed_trial_and_the_sweep_goes_on(tmp_path, data_dir):
  # 3 heads do not divide the width of 64: every train run stops with that error.
  directory = tmp_path / 'sweep'
  console = run_sweep(directory, data_dir, '--trials', '2', '--set=model.num_heads=3')
  rows = results(directory)
  assert [(row['number'], row['state']) for row in rows] == [(0, 'fail'), (1, 'fail')]
  assert console.count('failed (exit status 1)') == 2
  assert 'not divisible by model.num_heads=3' in console
  assert not (directory / 'best_config.json').exists()
