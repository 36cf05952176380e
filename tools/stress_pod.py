"""Hang rate of short simulated-pod runs: N runs of `launch/local_pod` (2 processes
x 2 CPU devices by default, gloo across them), each with two evaluations. Prints
one JSON line per run and a summary.

    python tools/stress_pod.py --runs 10 [--devices_per_process 2] [--kill_after 300]

A run counts as `hung` if lmjax's watchdog ended it (`made no progress`), or if
it was still running after --kill_after seconds (then it is killed: a hang that
nothing bounded); `ok` if it exited 0; `failed` otherwise.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one_run(workdir: str, args) -> dict:
  command = [
    sys.executable,
    os.path.join(REPO, 'launch', 'local_pod'),
    '--processes',
    str(args.processes),
    '--devices_per_process',
    str(args.devices_per_process),
    '--',
    '--config',
    os.path.join(REPO, 'configs', 'default.py'),
    '--workdir',
    workdir,
    f'--config.train.num_steps={args.steps}',
    f'--config.train.eval_every={args.steps // 2}',
    '--config.sample.max_new_tokens=20',
  ]
  if args.phase_timeout_s > 0:  # (0: a checkout from before the watchdog)
    command.append(f'--config.train.phase_timeout_s={args.phase_timeout_s}')
  start = time.monotonic()
  process = subprocess.Popen(
    command,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    start_new_session=True,
    env={**os.environ, 'PYTHON': sys.executable},
  )
  try:
    output, _ = process.communicate(timeout=args.kill_after)
    killed = False
  except subprocess.TimeoutExpired:
    os.killpg(process.pid, signal.SIGKILL)
    output, _ = process.communicate()
    killed = True
  seconds = time.monotonic() - start
  lines = [line for line in output.splitlines() if line.strip()]
  if killed or 'made no progress' in output:
    state = 'hung'
  else:
    state = 'ok' if process.returncode == 0 else 'failed'
  return {
    'state': state,
    'returncode': process.returncode,
    'seconds': round(seconds, 1),
    'killed': killed,
    'last_line': lines[-1][:200] if lines else '',
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--runs', type=int, default=10)
  parser.add_argument('--processes', type=int, default=2)
  parser.add_argument('--devices_per_process', type=int, default=2)
  parser.add_argument('--steps', type=int, default=100)
  parser.add_argument('--phase_timeout_s', type=float, default=60.0)
  parser.add_argument('--kill_after', type=float, default=300.0)
  args = parser.parse_args()
  counts = {'ok': 0, 'hung': 0, 'failed': 0}
  with tempfile.TemporaryDirectory() as root:
    for index in range(args.runs):
      result = one_run(os.path.join(root, f'run{index}'), args)
      counts[result['state']] += 1
      print(json.dumps({'run': index, **result}), flush=True)
  print(
    json.dumps(
      {
        'runs': args.runs,
        **counts,
        'hang_rate': counts['hung'] / args.runs,
        'processes': args.processes,
        'devices_per_process': args.devices_per_process,
      }
    )
  )


if __name__ == '__main__':
  main()
