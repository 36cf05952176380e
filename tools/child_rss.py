"""Runs a command in a child process of its own and measures it: wall time and
peak RSS (ru_maxrss of RUSAGE_CHILDREN is a maximum over every child so far,
so each command gets its own wrapper process). Shared by the benchmarks."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_WRAPPER = (
  'import resource, subprocess, sys, json, time;'
  't = time.perf_counter(); p = subprocess.run(sys.argv[1:], capture_output=True, text=True);'
  'r = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss;'
  'print(json.dumps({"rc": p.returncode, "seconds": time.perf_counter() - t,'
  ' "peak_rss_gb": r / 2**20, "stdout": p.stdout[-20000:], "stderr": p.stderr[-5000:]}))'
)


def measured(command: list) -> dict:
  """{seconds, peak_rss_gb, stdout, stderr} of `command` run from the repository;
  RuntimeError with its stderr if it fails."""
  done = subprocess.run(
    [sys.executable, '-c', _WRAPPER, *command], capture_output=True, text=True, cwd=REPO
  )
  result = json.loads(done.stdout.strip().splitlines()[-1])
  if result['rc'] != 0:
    raise RuntimeError(f'{" ".join(command)} failed:\n{result["stderr"]}')
  result['seconds'] = round(result['seconds'], 2)
  result['peak_rss_gb'] = round(result['peak_rss_gb'], 3)
  return result
