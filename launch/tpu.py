#!/usr/bin/env python3
"""Cloud TPU VM and pod-slice launcher: gcloud only, no training logic here.

    python launch/tpu.py create --name lm --zone us-central2-b --accelerator v4-32 [--spot]
    python launch/tpu.py setup  --name lm --zone us-central2-b [--source .]
    python launch/tpu.py run    --name lm --zone us-central2-b -- \
        --config configs/tpu/v4_32.py --workdir gs://BUCKET/runs/lm
    python launch/tpu.py logs   --name lm --zone us-central2-b [--all_workers]
    python launch/tpu.py status --name lm --zone us-central2-b
    python launch/tpu.py stop   --name lm --zone us-central2-b   # SIGTERM: save, then exit
    python launch/tpu.py delete --name lm --zone us-central2-b
    python launch/tpu.py sweep  --name lm --zone us-central2-b --slices 4 -- \
        --sweep configs/sweeps/X.py --dir sweeps/X --storage postgresql://USER@HOST/DB

Every command takes --dry_run, which prints the exact gcloud command lines
instead of running them. `run` starts the same `python -m lmjax.train ...` on
every worker at once (--worker=all), detached, logging to ~/lmjax_train.log on
each worker, with --env NAME (TFDS_DATA_DIR is passed by default when set)
forwarded. `run --watch` keeps a spot slice alive: when the slice is preempted
it deletes it, creates it again, sets it up and starts the same command, which
resumes from the latest checkpoint in the (GCS) workdir.

`sweep` starts one `python -m lmjax.sweep` worker on each of --slices
single-host slices (named NAME-0, NAME-1, ...; NAME alone for one), detached,
logging to ~/lmjax_sweep.log; all of them share one Optuna study through
--storage, a database every slice reaches (PostgreSQL, MySQL). Each keeps its
trials' directories under --dir on its own VM; started again on a slice, a
worker resumes that slice's interrupted trial.

Before `run` starts anything, it compiles the job for the slice's topology on
this machine (`lmjax.train --compile_only --topology ACCELERATOR`, which needs
libtpu: `pip install 'lmjax[aot]'`) and refuses a job whose per-chip peak
memory exceeds the chip's HBM; `--skip_fit_check` launches it anyway.
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

DEFAULT_RUNTIME = {
  'v4': 'tpu-ubuntu2204-base',
  'v5litepod': 'v2-alpha-tpuv5-lite',
  'v5p': 'v2-alpha-tpuv5',
  'v6e': 'v2-alpha-tpuv6e',
}
LOG = '~/lmjax_train.log'
SWEEP_LOG = '~/lmjax_sweep.log'
# Slices of one host: a sweep trial is one lmjax.train process.
SINGLE_HOST = {
  'v4-8',
  'v5litepod-1',
  'v5litepod-4',
  'v5litepod-8',
  'v5p-8',
  'v6e-1',
  'v6e-4',
  'v6e-8',
}
REMOTE_DIR = '~/lmjax'
PASSED_ENV = ('TFDS_DATA_DIR',)


def _base(args, *words):
  command = ['gcloud', 'compute', 'tpus', *words, args.name, f'--zone={args.zone}']
  if args.project:
    command.append(f'--project={args.project}')
  return command


def _ssh(args, remote: str, worker: str = 'all'):
  return _base(args, 'tpu-vm', 'ssh') + [f'--worker={worker}', f'--command={remote}']


def runtime_version(args) -> str:
  if args.runtime_version:
    return args.runtime_version
  family = args.accelerator.rsplit('-', 1)[0]
  if family not in DEFAULT_RUNTIME:
    raise SystemExit(f'no default --runtime_version for {args.accelerator}; pass one')
  return DEFAULT_RUNTIME[family]


def create_commands(args):
  version = runtime_version(args)
  if args.queued:
    command = _base(args, 'queued-resources', 'create') + [
      f'--node-id={args.name}',
      f'--accelerator-type={args.accelerator}',
      f'--runtime-version={version}',
    ]
  else:
    command = _base(args, 'tpu-vm', 'create') + [
      f'--accelerator-type={args.accelerator}',
      f'--version={version}',
    ]
  if args.spot:
    command.append('--spot')
  if args.reserved:
    command.append('--reserved')
  return [command]


def setup_commands(args):
  """Install lmjax (with the `tpu` extra) on every worker: from a git URL, or from
  the committed HEAD of a local checkout (git archive -> scp -> untar)."""
  install = (
    f"cd {REMOTE_DIR} && python3 -m pip install --upgrade pip && python3 -m pip install -e '.[tpu]'"
  )
  if args.source.startswith(('https://', 'git@')):
    fetch = f'rm -rf {REMOTE_DIR} && git clone --depth 1 {shlex.quote(args.source)} {REMOTE_DIR}'
    return [_ssh(args, f'{fetch} && {install}')]
  tarball = f'/tmp/lmjax-{args.name}.tar.gz'
  archive = [
    'git',
    '-C',
    args.source,
    'archive',
    '--format=tar.gz',
    '--prefix=lmjax/',
    '-o',
    tarball,
    'HEAD',
  ]
  copy = [
    'gcloud',
    'compute',
    'tpus',
    'tpu-vm',
    'scp',
    tarball,
    f'{args.name}:lmjax.tar.gz',
    f'--zone={args.zone}',
    '--worker=all',
  ] + ([f'--project={args.project}'] if args.project else [])
  unpack = f'rm -rf {REMOTE_DIR} && tar xzf ~/lmjax.tar.gz -C ~ && {install}'
  return [archive, copy, _ssh(args, unpack)]


def forwarded_env(args) -> list:
  """NAME=value for TFDS_DATA_DIR and every --env NAME set here."""
  return [
    f'{name}={shlex.quote(os.environ[name])}'
    for name in dict.fromkeys(PASSED_ENV + tuple(args.env or ()))
    if name in os.environ
  ]


def train_command_line(args) -> str:
  env = forwarded_env(args)
  train = ' '.join(shlex.quote(a) for a in ['python3', '-m', 'lmjax.train', *args.train_args])
  env.append('LMJAX_DISTRIBUTED=auto')  # every worker joins the slice's jax.distributed job
  return f'cd {REMOTE_DIR} && {" ".join(env)} nohup {train} > {LOG} 2>&1 < /dev/null &'


def fit_check_command(args, python: str = 'python') -> list:
  """`--compile_only` for the slice's topology (lmjax.aot): compiled here, with libtpu."""
  return [
    python,
    '-m',
    'lmjax.train',
    *args.train_args,
    '--compile_only',
    f'--topology={args.accelerator}',
  ]


def fit_check(args) -> None:
  """Compiles the job for the slice on this machine and refuses one that cannot fit
  a chip's HBM (--skip_fit_check launches it anyway)."""
  if args.skip_fit_check:
    return
  skip = 'pass --skip_fit_check to launch without the check'
  if args.dry_run:
    print(f'# fit check, on this machine first: {show(fit_check_command(args))} ({skip})')
    return
  print(f'fit check: compiling the job for {args.accelerator} on this machine', flush=True)
  result = subprocess.run(
    fit_check_command(args, sys.executable),
    capture_output=True,
    text=True,
    cwd=os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'),
    env={**os.environ, 'JAX_PLATFORMS': 'cpu'},  # compiling for the slice needs no local TPU
  )
  if result.returncode != 0:
    reason = ' '.join(line for line in result.stderr.strip().splitlines()[-3:])
    raise SystemExit(f'run: the fit check could not compile the job: {reason}\n{skip}')
  report = json.loads(result.stdout)
  chip = report['per_chip']
  where = f'{report["topology"]} ({report["device_kind"]})'
  if not chip.get('fits', True):
    need = chip.get('peak_gib', chip.get('required_gib'))
    short = f' ({-chip["margin_gib"]:.2f} GiB short)' if 'margin_gib' in chip else ''
    raise SystemExit(
      f'run: the job needs {need} GiB a chip and {where} chips hold '
      f'{chip["hbm_gib"]} GiB{short}. Lower '
      'train.batch_size (or raise train.microbatches), shard further (mesh.fsdp) or '
      f'set model.remat; or {skip}'
    )
  print(
    f'fit check: {chip["peak_gib"]:.2f} of {chip["hbm_gib"]:.0f} GiB a chip on {where}; '
    f'roofline step {report["step_s_estimate"]} s',
    flush=True,
  )


def run_commands(args):
  if not args.train_args:
    raise SystemExit(
      'run: give the training arguments after --, e.g. '
      '-- --config configs/tpu/v4_8.py --workdir gs://BUCKET/run'
    )
  return [_ssh(args, train_command_line(args))]


def sweep_commands(args):
  """One sweep worker per slice, against the shared --storage."""
  sweep_args = args.train_args
  if '--storage' not in sweep_args and not any(a.startswith('--storage=') for a in sweep_args):
    raise SystemExit(
      'sweep: the slices share one study through a database: give --storage URL after --, '
      'e.g. -- --sweep configs/sweeps/X.py --dir sweeps/X --storage postgresql://USER@HOST/DB'
    )
  if args.accelerator not in SINGLE_HOST:
    raise SystemExit(
      f'sweep: {args.accelerator} has several hosts; a sweep trial is one process, so use '
      f'single-host slices ({", ".join(sorted(SINGLE_HOST))})'
    )
  worker = ' '.join(shlex.quote(a) for a in ['python3', '-m', 'lmjax.sweep', *sweep_args])
  started = ' '.join([*forwarded_env(args), 'nohup', worker])
  remote = f'cd {REMOTE_DIR} && {started} > {SWEEP_LOG} 2>&1 < /dev/null &'
  names = [args.name] if args.slices == 1 else [f'{args.name}-{i}' for i in range(args.slices)]
  return [_ssh(argparse.Namespace(**{**vars(args), 'name': n}), remote, '0') for n in names]


def logs_commands(args):
  follow = '' if args.all_workers else ' -f'
  return [
    _ssh(args, f'tail -n {args.lines}{follow} {LOG}', worker='all' if args.all_workers else '0')
  ]


def status_commands(args):
  if args.queued:
    return [_base(args, 'queued-resources', 'describe') + ['--format=value(state.state)']]
  return [_base(args, 'tpu-vm', 'describe') + ['--format=value(state)']]


def stop_commands(args):
  # SIGTERM, as a maintenance event sends: each worker saves a checkpoint and exits.
  return [_ssh(args, "pkill -TERM -f 'lmjax.train' || true")]


def delete_commands(args):
  if args.queued:
    return [_base(args, 'queued-resources', 'delete') + ['--force', '--quiet']]
  return [_base(args, 'tpu-vm', 'delete') + ['--quiet']]


COMMANDS = {
  'create': create_commands,
  'setup': setup_commands,
  'run': run_commands,
  'logs': logs_commands,
  'status': status_commands,
  'stop': stop_commands,
  'delete': delete_commands,
  'sweep': sweep_commands,
}


def show(command) -> str:
  return ' '.join(shlex.quote(word) for word in command)


def execute(commands, dry_run: bool) -> None:
  for command in commands:
    print(show(command), flush=True)
    if not dry_run:
      subprocess.run(command, check=True)


def watch(args) -> None:
  """Starts the run, then re-creates and restarts it whenever the slice is lost."""
  lifecycle = setup_commands(args) + run_commands(args)
  if args.dry_run:
    execute(create_commands(args) + lifecycle, True)
    print('# then every --poll seconds: ' + show(status_commands(args)[0]))
    print('# and when the state is PREEMPTED, TERMINATED or the slice is gone:')
    execute(delete_commands(args) + create_commands(args) + lifecycle, True)
    return
  execute(lifecycle, False)
  while True:
    time.sleep(args.poll)
    status = subprocess.run(status_commands(args)[0], capture_output=True, text=True)
    state = status.stdout.strip() if status.returncode == 0 else 'GONE'
    if state in ('READY', 'ACTIVE', 'CREATING', 'PROVISIONING', 'WAITING_FOR_RESOURCES'):
      continue
    print(f'slice {args.name} is {state}: re-creating it and resuming the run', flush=True)
    subprocess.run(delete_commands(args)[0])  # may already be gone
    execute(create_commands(args) + lifecycle, False)


def parse(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('command', choices=sorted(COMMANDS))
  parser.add_argument('--name', required=True, help='TPU VM / slice name')
  parser.add_argument('--zone', required=True)
  parser.add_argument('--project', default='')
  parser.add_argument('--accelerator', default='v4-8', help='e.g. v4-8, v4-32, v5litepod-16')
  parser.add_argument('--runtime_version', default='', help='default: per TPU generation')
  parser.add_argument('--spot', action='store_true', help='spot (preemptible) capacity')
  parser.add_argument('--reserved', action='store_true', help='use a reservation')
  parser.add_argument('--queued', action='store_true', help='through queued resources')
  parser.add_argument('--source', default='.', help='local checkout to copy, or a git URL')
  parser.add_argument('--env', action='append', help='environment variable to forward')
  parser.add_argument('--all_workers', action='store_true', help='logs: every worker')
  parser.add_argument('--lines', type=int, default=100)
  parser.add_argument('--watch', action='store_true', help='run: re-create on preemption')
  parser.add_argument('--poll', type=int, default=60, help='--watch: seconds between checks')
  parser.add_argument('--dry_run', action='store_true', help='print the gcloud commands only')
  parser.add_argument('--slices', type=int, default=1, help='sweep: slices, one worker each')
  parser.add_argument(
    '--skip_fit_check', action='store_true', help='run: launch without compiling it here first'
  )
  cut = argv.index('--') if '--' in argv else len(argv)
  args = parser.parse_args(argv[:cut])
  args.train_args = argv[cut + 1 :]  # everything after --: lmjax.train's (sweep: lmjax.sweep's)
  return args


def main(argv=None) -> int:
  args = parse(sys.argv[1:] if argv is None else argv)
  if args.command == 'run' and args.train_args:
    fit_check(args)
  if args.command == 'run' and args.watch:
    watch(args)
  else:
    execute(COMMANDS[args.command](args), args.dry_run)
  return 0


if __name__ == '__main__':
  sys.exit(main())
