#!/usr/bin/env python
"""Compile time against depth, scanned blocks against the loop. Prints one JSON line.

    python tools/bench_compile.py [--config configs/default.py] [--layers 2,24]
        [--topology v5e:2x2]

Compiles the real train step (`lmjax.aot.compile_report`, the step a run
trains with) for each depth with `model.scan_layers` on and off, on this
machine's devices and, with --topology (libtpu), for that TPU slice, and
reports each compile time and the deepest over the shallowest ratio. Every
compile runs in this one process, one after another, so the ratios compare
like with like on a noisy machine.
"""

import json
import os
import sys

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lmjax import aot  # noqa: E402 (after the path)
from lmjax import config as config_lib  # noqa: E402

flags.DEFINE_string('config', 'configs/default.py', 'The config whose depth varies.')
flags.DEFINE_string('layers', '2,24', 'Depths to compile, shallowest first.')
flags.DEFINE_string('topology', '', 'Also compile for this TPU slice (needs libtpu).')


def _main(argv):
  del argv
  depths = [int(n) for n in flags.FLAGS.layers.split(',')]
  targets = [''] + ([flags.FLAGS.topology] if flags.FLAGS.topology else [])
  result = {'config': flags.FLAGS.config, 'layers': depths}
  for target in targets:
    for scan in (True, False):
      seconds = []
      for depth in depths:
        config = config_lib.load_config_file(flags.FLAGS.config)
        config.model.num_layers, config.model.scan_layers = depth, scan
        config.compilation_cache_dir = ''  # every compile from scratch
        report = aot.compile_report(config, target)
        seconds.append(report['compile_s'])
      name = f'{target or "cpu"}_{"scan" if scan else "loop"}'
      result[name] = {'compile_s': seconds, 'ratio': round(seconds[-1] / seconds[0], 2)}
  print(json.dumps(result))


if __name__ == '__main__':
  app.run(_main)
