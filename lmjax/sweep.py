"""Hyper-parameter search on Optuna: every trial a real `lmjax.train` run.

    python -m lmjax.sweep --sweep configs/sweeps/tiny.py --dir SWEEPDIR \
        [--workers N] [--storage URL] [--set KEY=VALUE ...] [--report]

A sweep file defines `get_sweep()` returning a `Sweep`: the base run (a config
file and overrides), the search space over dotted config keys, the objective
and its direction, the sampler, the pruner and a budget. It is checked whole
(every key, every range) before anything runs.

Trials. Each trial is `python -m lmjax.train` in its own subprocess, in
SWEEPDIR/trials/<number>/, so a crash is a failed trial, not the end of the
sweep. The train run reports every periodic evaluation to the study (Optuna's
`trial.report`, from inside the run: `LMJAX_SWEEP_TRIAL` tells it where) and
asks the pruner; a pruned run saves a checkpoint at that evaluation and exits
with PRUNED_EXIT_CODE. The objective of a finished trial is its final
evaluation (`final_eval/<metric>` in its metrics.jsonl).

The study lives in an Optuna storage: by default an embedded journal file,
SWEEPDIR/study.journal (Optuna's JournalFileBackend: many processes, no
server); or `--storage URL` (PostgreSQL, MySQL, SQLite), which workers on many
machines share through Optuna's own distributed mode. `--workers N` runs N
local workers at once; on CPU each gets its share of the cores (and so its
own CPU devices: lmjax.cpu_host splits what a process may use).

Kill and restart. A worker holds a lock on its trial's directory (flock: the
kernel drops it when the worker dies, kill -9 included) and its train
subprocess dies with it (PR_SET_PDEATHSIG). Started again, a worker first
takes over every RUNNING trial of this host whose lock is free and runs it
again in the same directory, where training resumes from its latest
checkpoint, exactly; only then does it ask the sampler for new trials. Asking
and taking over happen under SWEEPDIR/ask.lock, so no trial runs twice and no
number appears twice.

Outputs: SWEEPDIR/results.csv and results.json (one row per trial),
best_config.json (the best trial's full config) and PNG plots drawn with
matplotlib (the objective against each parameter, every trial's validation
curve, parallel coordinates); `--report` draws them again from the study.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import zlib
from collections.abc import Sequence

from lmjax import config as config_lib
from lmjax import locks

PRUNED_EXIT_CODE = 77  # a train run the pruner stopped (with a checkpoint at that evaluation)
TRIAL_ENV = 'LMJAX_SWEEP_TRIAL'  # JSON: where a train run reports (see TrialReporter)
SAMPLERS = ('grid', 'random', 'tpe')
PRUNERS = ('none', 'median', 'successive_halving', 'hyperband')
DIRECTIONS = ('minimize', 'maximize')


class SweepError(ValueError):
  """A sweep file that cannot run: the message says what and where."""


@dataclasses.dataclass(frozen=True)
class Float:
  """A float in [low, high], log-uniform with `log`; `step` makes it discrete."""

  low: float
  high: float
  log: bool = False
  step: float | None = None


@dataclasses.dataclass(frozen=True)
class Int:
  """An integer in [low, high] (both included), every `step`-th."""

  low: int
  high: int
  log: bool = False
  step: int = 1


@dataclasses.dataclass(frozen=True)
class Categorical:
  """One of `choices` (numbers, strings or booleans)."""

  choices: tuple


@dataclasses.dataclass(frozen=True)
class Sweep:
  """What a sweep file's get_sweep() returns (see the module docstring)."""

  config: str  # the base run's config file, as lmjax.train's --config takes it
  space: dict  # dotted config key -> Float | Int | Categorical
  overrides: dict = dataclasses.field(default_factory=dict)  # dotted key -> value, every trial
  objective: str = 'eval/loss'  # a key of the run's evaluations
  direction: str = 'minimize'
  sampler: str = 'tpe'  # SAMPLERS
  pruner: str = 'median'  # PRUNERS
  trials: int = 0  # budget: trials started (0 = none; grid: the grid's size)
  timeout_s: float = 0.0  # budget: no new trial after this many seconds (0 = none)
  seed: int = 0  # the sampler's
  startup_trials: int = 1  # median pruner: trials finished before any is pruned
  prune_after_steps: int = 0  # median pruner: no trial is pruned before this step
  sampler_startup_trials: int = 0  # TPE: random trials before it models (0 = Optuna's 10)
  baseline: bool = True  # trial 0 runs the base config's own values (not with the grid)
  name: str = ''  # the study's name ('' = the sweep file's name)

  @property
  def metric(self) -> str:
    return self.objective.split('/', 1)[1]


def load(spec: str, trials: int | None = None, timeout_s: float | None = None) -> Sweep:
  """The Sweep of `configs/sweeps/NAME.py` (its get_sweep()), checked; `trials` and
  `timeout_s` replace its budget."""
  module = config_lib.import_file(spec)
  if not hasattr(module, 'get_sweep'):
    raise SweepError(f'sweep file {spec!r} defines no get_sweep()')
  sweep = module.get_sweep()
  if not isinstance(sweep, Sweep):
    raise SweepError(f'{spec}: get_sweep() must return an lmjax.sweep.Sweep, got {type(sweep)}')
  if not sweep.name:
    sweep = dataclasses.replace(sweep, name=os.path.splitext(os.path.basename(spec))[0])
  if trials is not None:
    sweep = dataclasses.replace(sweep, trials=trials)
  if timeout_s is not None:
    sweep = dataclasses.replace(sweep, timeout_s=timeout_s)
  check(sweep, spec)
  return sweep


def base_config(sweep: Sweep, extra: dict | None = None):
  """The base run's config with the sweep's overrides (and `extra`) applied."""
  config = config_lib.load_config_file(sweep.config)
  for dotted, value in {**sweep.overrides, **(extra or {})}.items():
    config_lib.set_value(config, dotted, value)
  return config


def check(sweep: Sweep, where: str = 'the sweep') -> None:
  """Every choice, range and key of `sweep`, before anything runs."""
  for name, value, valid in (
    ('sampler', sweep.sampler, SAMPLERS),
    ('pruner', sweep.pruner, PRUNERS),
    ('direction', sweep.direction, DIRECTIONS),
  ):
    if value not in valid:
      raise SweepError(f'{where}: {name}={value!r}; choose one of {", ".join(valid)}')
  if not sweep.space:
    raise SweepError(f'{where}: the search space is empty; give space={{dotted key: range}}')
  if not sweep.objective.startswith('eval/') or not sweep.metric:
    raise SweepError(
      f"{where}: objective={sweep.objective!r} must name an evaluation metric, e.g. 'eval/loss'"
    )
  try:
    config = base_config(sweep)
    for dotted in sweep.space:
      config_lib.check_key_path(config, dotted)
  except config_lib.ConfigError as error:
    raise SweepError(f'{where}: {error}') from None
  for dotted, dist in sweep.space.items():
    if isinstance(dist, (Float, Int)):
      if not dist.low < dist.high:
        raise SweepError(f'{where}: {dotted}: low={dist.low} must be below high={dist.high}')
      if dist.log and dist.low <= 0:
        raise SweepError(f'{where}: {dotted}: a log range needs low > 0, got {dist.low}')
    elif isinstance(dist, Categorical):
      if not dist.choices:
        raise SweepError(f'{where}: {dotted}: Categorical has no choices')
    else:
      raise SweepError(f'{where}: {dotted}: {dist!r} is not a Float, Int or Categorical')
    if sweep.sampler == 'grid' and isinstance(dist, Float) and dist.step is None:
      raise SweepError(f'{where}: {dotted}: the grid sampler needs a Float with a step')
  if sweep.sampler != 'grid' and sweep.trials <= 0 and sweep.timeout_s <= 0:
    raise SweepError(f'{where}: give a budget: trials=N, timeout_s=S, or both')


def grid(sweep: Sweep) -> dict[str, list]:
  """The grid sampler's points per key."""
  points = {}
  for dotted, dist in sweep.space.items():
    if isinstance(dist, Categorical):
      points[dotted] = list(dist.choices)
    else:
      count = int(round((dist.high - dist.low) / dist.step)) + 1
      points[dotted] = [type(dist.low)(dist.low + i * dist.step) for i in range(count)]
  return points


def budget(sweep: Sweep) -> int:
  """Trials to start in all (0: only the time budget)."""
  if sweep.sampler == 'grid':
    size = math.prod(len(v) for v in grid(sweep).values())
    return min(size, sweep.trials) if sweep.trials > 0 else size
  return sweep.trials


def _optuna():
  import optuna

  optuna.logging.set_verbosity(optuna.logging.WARNING)
  return optuna


def make_sampler(sweep: Sweep, stream: int = 0):
  """The sampler, seeded with the sweep's seed + `stream`: workers sampling one
  study each draw their own numbers (the same seed would propose the same points)."""
  optuna = _optuna()
  seed = sweep.seed + stream
  if sweep.sampler == 'grid':
    return optuna.samplers.GridSampler(grid(sweep), seed=seed)
  if sweep.sampler == 'random':
    return optuna.samplers.RandomSampler(seed=seed)
  startup = sweep.sampler_startup_trials
  return optuna.samplers.TPESampler(seed=seed, **({'n_startup_trials': startup} if startup else {}))


def make_pruner(sweep: Sweep):
  optuna = _optuna()
  if sweep.pruner == 'median':
    return optuna.pruners.MedianPruner(
      n_startup_trials=sweep.startup_trials, n_warmup_steps=sweep.prune_after_steps
    )
  if sweep.pruner == 'successive_halving':
    return optuna.pruners.SuccessiveHalvingPruner()
  if sweep.pruner == 'hyperband':
    return optuna.pruners.HyperbandPruner()
  return optuna.pruners.NopPruner()


def storage_for(directory: str, url: str = ''):
  """`url` (any Optuna storage URL), or the embedded journal file in `directory`."""
  optuna = _optuna()
  if url:
    return url
  from optuna.storages import journal

  os.makedirs(directory, exist_ok=True)
  return optuna.storages.JournalStorage(
    journal.JournalFileBackend(os.path.join(directory, 'study.journal'))
  )


def _distribution(dist):
  optuna = _optuna()
  d = optuna.distributions
  if isinstance(dist, Float):
    return d.FloatDistribution(dist.low, dist.high, log=dist.log, step=dist.step)
  if isinstance(dist, Int):
    return d.IntDistribution(dist.low, dist.high, log=dist.log, step=dist.step)
  return d.CategoricalDistribution(list(dist.choices))


def open_study(sweep: Sweep, storage, stream: int = 0):
  """The sweep's study, created on first use (with its start time, and the
  baseline trial enqueued), sampling with seed stream `stream`."""
  optuna = _optuna()
  study = optuna.create_study(
    study_name=sweep.name,
    storage=storage,
    sampler=make_sampler(sweep, stream),
    pruner=make_pruner(sweep),
    direction=sweep.direction,
    load_if_exists=True,
  )
  if 'started_at' not in study.user_attrs:
    study.set_user_attr('started_at', time.time())
    if sweep.baseline and sweep.sampler != 'grid':
      config = base_config(sweep)
      study.enqueue_trial({k: config_lib.get(config, k) for k in sweep.space})
  return study


class TrialReporter:
  """Inside a train run of a sweep: reports each periodic evaluation to the
  trial and asks the pruner (`__call__(step, record) -> prune?`)."""

  def __init__(self, settings: dict):
    optuna = _optuna()
    sweep = load(settings['sweep'])
    study = optuna.load_study(
      study_name=sweep.name,
      storage=storage_for(settings['dir'], settings.get('storage', '')),
      pruner=make_pruner(sweep),
    )
    self.trial = optuna.trial.Trial(study, settings['trial_id'])
    self.key = sweep.objective

  @classmethod
  def from_environment(cls) -> TrialReporter | None:
    settings = os.environ.get(TRIAL_ENV)
    return cls(json.loads(settings)) if settings else None

  def __call__(self, step: int, record: dict) -> bool:
    if self.key not in record:
      raise SweepError(
        f'the sweep objective {self.key!r} is not among the evaluation metrics '
        f'{sorted(record)}: set objective= in the sweep file'
      )
    self.trial.report(float(record[self.key]), step)
    return self.trial.should_prune()


def _override_args(values: dict) -> list[str]:
  args = []
  for dotted, value in values.items():
    text = json.dumps(value) if isinstance(value, str) and not value else str(value)
    args.append(f'--config.{dotted}={text}')
  return args


def _die_with_parent(cores: Sequence[int] | None):
  """For a child process: SIGKILL when its parent dies (Linux), and its cores."""

  def setup():
    try:
      import ctypes

      ctypes.CDLL('libc.so.6', use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
      pass
    if cores:
      os.sched_setaffinity(0, cores)

  return setup


def _final_metrics(workdir: str) -> dict:
  """The last final_eval record of a run's metrics.jsonl, and its step."""
  found, last_step = {}, 0
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return {}
  with open(path, encoding='utf-8') as f:
    for line in f:
      record = json.loads(line)
      last_step = max(last_step, int(record.get('step', 0)))
      final = {k: v for k, v in record.items() if k.startswith('final_eval/')}
      if final:
        found = {**final, 'step': record.get('step')}
  return {**found, 'last_step': last_step}


class Worker:
  """One worker: takes over orphaned trials of this host, then asks for new
  ones until the budget is spent; runs each as a train subprocess."""

  def __init__(
    self,
    sweep_file: str,
    sweep: Sweep,
    directory: str,
    storage_url: str = '',
    extra=None,
    cores=None,
    label: str = '',
    index: int = 0,
  ):
    """Worker `index` of this machine's; with a shared --storage, its seed stream
    also depends on the host, so machines sample apart."""
    self.sweep_file, self.directory, self.storage_url = sweep_file, directory, storage_url
    self.sweep = sweep
    self.extra = dict(extra or {})
    self.cores = cores
    self.label = label
    self.host = socket.gethostname()
    self.storage = storage_for(directory, storage_url)
    stream = index + (zlib.crc32(self.host.encode()) % 1_000_003 if storage_url else 0)
    self.study = open_study(self.sweep, self.storage, stream)

  def log(self, message: str) -> None:
    print(f'{self.label}{message}', flush=True)

  def trial_dir(self, number: int) -> str:
    return os.path.join(self.directory, 'trials', str(number))

  def _next(self):
    """(trial id, number, params, resumed, its directory's lock, held) of the trial
    to run next: an orphan of this host first; None when the budget is spent."""
    optuna = _optuna()
    with locks.Lock(self.directory, 'ask.lock', 'a sweep worker asking', wait=True):
      for frozen in self.study.get_trials(
        deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)
      ):
        if frozen.user_attrs.get('host') not in (self.host, None):
          continue  # another machine's: its own workers take it over
        lock = locks.Lock(self.trial_dir(frozen.number), 'sweep.lock', 'a sweep worker')
        try:
          lock.acquire()
        except locks.LockError:
          continue  # its worker is alive
        self.study._storage.set_trial_user_attr(
          frozen._trial_id, 'worker', f'{self.host}:{os.getpid()}'
        )
        return frozen._trial_id, frozen.number, frozen.params, True, lock
      started = self.study.get_trials(deepcopy=False)
      begun = [t for t in started if t.state != optuna.trial.TrialState.WAITING]
      total = budget(self.sweep)
      if total and len(begun) >= total:
        return None
      elapsed = time.time() - float(self.study.user_attrs.get('started_at', time.time()))
      if self.sweep.timeout_s and elapsed >= self.sweep.timeout_s:
        return None
      trial = self.study.ask({k: _distribution(d) for k, d in self.sweep.space.items()})
      trial.set_user_attr('host', self.host)
      trial.set_user_attr('worker', f'{self.host}:{os.getpid()}')
      trial.set_user_attr('workdir', self.trial_dir(trial.number))
      lock = locks.Lock(self.trial_dir(trial.number), 'sweep.lock', 'a sweep worker')
      lock.acquire()
      return trial._trial_id, trial.number, trial.params, False, lock

  def run(self) -> None:
    while True:
      claimed = self._next()
      if claimed is None:
        return
      trial_id, number, params, resumed, lock = claimed
      try:
        self._run_trial(trial_id, number, params, resumed)
      finally:
        lock.release()

  def _run_trial(self, trial_id: int, number: int, params: dict, resumed: bool) -> None:
    optuna = _optuna()
    workdir = self.trial_dir(number)
    shown = ', '.join(
      f'{k}={v:.4g}' if isinstance(v, float) else f'{k}={v}' for k, v in params.items()
    )
    self.log(f'trial {number} {"resumed" if resumed else "started"}: {shown}')
    command = [
      sys.executable,
      '-m',
      'lmjax.train',
      '--config',
      self.sweep.config,
      '--workdir',
      workdir,
      *_override_args({**self.sweep.overrides, **self.extra, **params}),
    ]
    settings = {
      'sweep': os.path.abspath(self.sweep_file),
      'dir': self.directory,
      'storage': self.storage_url,
      'trial_id': trial_id,
    }
    env = {**os.environ, TRIAL_ENV: json.dumps(settings)}
    start = time.time()
    with open(os.path.join(workdir, 'train.log'), 'a', encoding='utf-8') as log_file:
      code = subprocess.call(
        command,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        env=env,
        preexec_fn=_die_with_parent(self.cores),
      )
    wall = time.time() - start + float(self._attrs(trial_id).get('wall_s', 0.0))
    self.study._storage.set_trial_user_attr(trial_id, 'wall_s', wall)
    final = _final_metrics(workdir)
    self.study._storage.set_trial_user_attr(trial_id, 'steps', final.get('last_step', 0))
    key = f'final_eval/{self.sweep.metric}'
    if code == 0 and key in final:
      value = float(final[key])
      self.study.tell(number, value)
      best = self.study.best_trial
      self.log(
        f'trial {number} finished: {self.sweep.objective} {value:.4f} in {wall:.0f}s '
        f'(best so far: trial {best.number}, {best.value:.4f})'
      )
    elif code == PRUNED_EXIT_CODE:
      self.study.tell(number, state=optuna.trial.TrialState.PRUNED)
      self.log(f'trial {number} pruned at step {final.get("last_step", 0)}')
    else:
      tail = _tail(os.path.join(workdir, 'train.log'))
      self.study._storage.set_trial_user_attr(trial_id, 'error', tail)
      self.study.tell(number, state=optuna.trial.TrialState.FAIL)
      self.log(
        f'trial {number} failed (exit status {code}): {tail.splitlines()[-1] if tail else ""}'
      )

  def _attrs(self, trial_id: int) -> dict:
    return self.study._storage.get_trial(trial_id).user_attrs


def _tail(path: str, lines: int = 5) -> str:
  try:
    with open(path, encoding='utf-8', errors='replace') as f:
      return ''.join(f.readlines()[-lines:]).strip()
  except OSError:
    return ''


# -- outputs ---------------------------------------------------------------------------


def rows(study) -> list[dict]:
  """One row per trial: number, state, parameters, objective, steps, wall time."""
  out = []
  for trial in study.get_trials(deepcopy=False):
    out.append(
      {
        'number': trial.number,
        'state': trial.state.name.lower(),
        **{f'params.{k}': v for k, v in trial.params.items()},
        'objective': trial.value,
        'steps': trial.user_attrs.get('steps'),
        'wall_s': round(float(trial.user_attrs.get('wall_s', 0.0)), 1),
        'workdir': trial.user_attrs.get('workdir'),
        'worker': trial.user_attrs.get('worker'),
      }
    )
  return out


def report(sweep: Sweep, directory: str, storage_url: str = '') -> dict:
  """results.csv, results.json, best_config.json and the plots, from the study."""
  optuna = _optuna()
  study = optuna.load_study(study_name=sweep.name, storage=storage_for(directory, storage_url))
  table = rows(study)
  keys = sorted({k for row in table for k in row}, key=lambda k: (k != 'number', k != 'state', k))
  with open(os.path.join(directory, 'results.csv'), 'w', newline='', encoding='utf-8') as f:
    writer = csv.DictWriter(f, fieldnames=keys)
    writer.writeheader()
    writer.writerows(table)
  with open(os.path.join(directory, 'results.json'), 'w', encoding='utf-8') as f:
    json.dump(table, f, indent=2)
  summary = {'trials': len(table), 'objective': sweep.objective, 'direction': sweep.direction}
  complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == 'COMPLETE']
  if complete:
    best = study.best_trial
    with open(os.path.join(best.user_attrs['workdir'], 'config.json'), encoding='utf-8') as f:
      best_config = json.load(f)
    with open(os.path.join(directory, 'best_config.json'), 'w', encoding='utf-8') as f:
      json.dump(best_config, f, indent=2, sort_keys=True)
    summary.update(best_trial=best.number, best_value=best.value, best_params=best.params)
  summary['plots'] = _plots(study, directory) if complete else []
  return summary


def _plots(study, directory: str) -> list[str]:
  import warnings

  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  from optuna.visualization import matplotlib as plots

  written = []
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')  # Optuna marks its matplotlib plots experimental
    for name, draw in (
      ('objective_vs_params.png', plots.plot_slice),
      ('validation_curves.png', plots.plot_intermediate_values),
      ('parallel_coordinates.png', plots.plot_parallel_coordinate),
    ):
      axes = draw(study)
      figure = (axes.flat[0] if hasattr(axes, 'flat') else axes).get_figure()
      path = os.path.join(directory, name)
      figure.savefig(path, dpi=100, bbox_inches='tight')
      plt.close(figure)
      written.append(path)
  return written


# -- command line ------------------------------------------------------------------------


def _parse_set(values: Sequence[str]) -> dict:
  extra = {}
  for item in values:
    key, sep, text = item.partition('=')
    if not sep:
      raise SweepError(f'--set {item!r}: write KEY=VALUE')
    try:
      extra[key] = json.loads(text)
    except json.JSONDecodeError:
      extra[key] = text
  return extra


def main(argv: Sequence[str] | None = None) -> int:
  import argparse

  parser = argparse.ArgumentParser(prog='python -m lmjax.sweep', description=__doc__.split('\n')[0])
  parser.add_argument('--sweep', required=True, help='configs/sweeps/NAME.py (get_sweep())')
  parser.add_argument('--dir', required=True, help='SWEEPDIR: trials, study, results')
  parser.add_argument('--workers', type=int, default=1, help='local workers running at once')
  parser.add_argument('--storage', default='', help='an Optuna storage URL shared by machines')
  parser.add_argument('--set', action='append', default=[], help='KEY=VALUE for every trial')
  parser.add_argument('--trials', type=int, default=None, help="the budget: overrides the file's")
  parser.add_argument('--timeout_s', type=float, default=None, help='the time budget, likewise')
  parser.add_argument('--report', action='store_true', help='only write results and plots')
  parser.add_argument('--worker_cores', default='', help=argparse.SUPPRESS)
  parser.add_argument('--worker_index', type=int, default=0, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  try:
    sweep = load(args.sweep, args.trials, args.timeout_s)
    extra = _parse_set(args.set)
    if extra:
      base_config(sweep, extra)  # a wrong --set key is named before anything runs
    directory = os.path.abspath(args.dir)
    if args.report:
      print(json.dumps(report(sweep, directory, args.storage), indent=2))
      return 0
    if args.worker_cores:  # one of --workers N
      cores = [int(c) for c in args.worker_cores.split(',')]
      label = f'[worker {os.getpid()}] '
      index = args.worker_index
      Worker(args.sweep, sweep, directory, args.storage, extra, cores, label, index).run()
      return 0
    _run(args, sweep, directory, extra)
    summary = report(sweep, directory, args.storage)
  except (SweepError, config_lib.ConfigError, locks.LockError) as error:
    print(f'error: {error}', file=sys.stderr)
    return 2
  print(json.dumps(summary, indent=2))
  return 0


def _run(args, sweep: Sweep, directory: str, extra: dict) -> None:
  total = budget(sweep)
  print(
    f'sweep {sweep.name}: {len(sweep.space)} parameters, {sweep.sampler} sampler, '
    f'{sweep.pruner} pruner, budget {total or "-"} trials'
    f'{f" / {sweep.timeout_s:.0f}s" if sweep.timeout_s else ""}, {args.workers} worker(s); '
    f'study in {args.storage or os.path.join(directory, "study.journal")}',
    flush=True,
  )
  if args.workers <= 1:
    Worker(args.sweep, sweep, directory, args.storage, extra).run()
    return
  cores = sorted(os.sched_getaffinity(0))
  shares = [cores[i :: args.workers] or cores for i in range(args.workers)]
  open_study(sweep, storage_for(directory, args.storage))  # created once, before the workers
  command = [sys.executable, '-m', 'lmjax.sweep', '--sweep', args.sweep, '--dir', directory]
  command += ['--storage', args.storage] if args.storage else []
  command += [f'--set={item}' for item in args.set]
  command += [] if args.trials is None else ['--trials', str(args.trials)]
  command += [] if args.timeout_s is None else ['--timeout_s', str(args.timeout_s)]
  workers = [
    subprocess.Popen(
      [*command, '--worker_cores', ','.join(map(str, share)), '--worker_index', str(i + 1)],
      preexec_fn=_die_with_parent(None),
    )
    for i, share in enumerate(shares)
  ]
  for worker in workers:
    worker.wait()


def run() -> None:
  """The `lmjax-sweep` console script."""
  sys.exit(main())


if __name__ == '__main__':
  # Run as lmjax.sweep, whose Sweep and ranges the sweep files import, not as this
  # __main__ copy of the module.
  from lmjax import sweep as _sweep

  sys.exit(_sweep.main())
