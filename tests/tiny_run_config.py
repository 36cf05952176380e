"""The tests' tiny config as a config file, for command-line runs:

python -m lmjax.train --config tests/tiny_run_config.py:CORPUS_DIR --workdir DIR
"""

import os
import pathlib
import sys

sys.path.insert(0, os.path.dirname(__file__))
from conftest import tiny_config  # noqa: E402


def get_config(corpus_dir):
  return tiny_config(pathlib.Path(corpus_dir))
