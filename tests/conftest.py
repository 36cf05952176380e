"""Test setup: 8 simulated CPU devices (set before jax is imported) and tiny configs."""

import os

os.environ['XLA_FLAGS'] = (
  os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
).strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# The CPU backend only: libtpu (the aot extra) is installed for compiling to TPU
# topologies (lmjax.aot), which needs no TPU backend.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import contextlib  # noqa: E402
import pathlib  # noqa: E402
import subprocess  # noqa: E402

import pytest  # noqa: E402

from lmjax import config as config_lib  # noqa: E402
from lmjax import cpu_host  # noqa: E402

cpu_host.prepare()  # the process settings of lmjax's entry points (no host split: 8 devices)

REPO = pathlib.Path(__file__).resolve().parent.parent
SHAKESPEARE_DIR = REPO.parent / 'shared' / 'data' / 'tinyshakespeare'


def shakespeare_text() -> str:
  path = SHAKESPEARE_DIR / 'input.txt'
  assert path.is_file(), f'tests need {path} (the shared tiny-shakespeare corpus)'
  return path.read_text(encoding='utf-8')


@pytest.fixture(scope='session')
def corpus_dir(tmp_path_factory) -> pathlib.Path:
  """Four text files cut from tiny-shakespeare: a small real corpus."""
  directory = tmp_path_factory.mktemp('corpus')
  text = shakespeare_text()[:240_000]
  quarter = len(text) // 4
  for i in range(4):
    (directory / f'part{i}.txt').write_text(text[i * quarter : (i + 1) * quarter], encoding='utf-8')
  return directory


def tiny_config(corpus_dir, **overrides):
  """A 2-layer, width-64 Transformer on the local corpus; overrides are 'a.b': value."""
  c = config_lib.base_config()
  c.compilation_cache_dir = ''  # hermetic: no cache shared between test runs
  c.data.name = 'files'
  c.data.files = str(corpus_dir / 'part[012].txt')
  c.data.validation_files = str(corpus_dir / 'part3.txt')
  c.data.seq_len = 32
  c.tokenizer.kind = 'chars'
  c.model.num_layers = 2
  c.model.num_heads = 2
  c.model.embed_dim = 64
  c.optimizer.learning_rate = 3e-3  # 1e-2 stalls near the bigram loss at this size
  c.optimizer.warmup_steps = 10
  c.train.batch_size = 32
  c.train.eval_batch_size = 32
  c.train.num_steps = 100
  c.train.log_every = 10
  c.train.eval_every = 50
  c.train.eval_batches = 4
  c.train.final_eval_batches = 8
  c.checkpoint.every = 50
  c.sample.prompt = 'ROMEO:'
  c.sample.max_new_tokens = 20
  for dotted, value in overrides.items():
    config_lib.set_value(c, dotted, value)
  return c


@contextlib.contextmanager
def small_tmpfs(directory: pathlib.Path, size: str):
  """A tmpfs of `size` (e.g. '200k') mounted at `directory`: a disk that fills up."""
  directory.mkdir()
  made = subprocess.run(
    ['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(directory)],
    capture_output=True,
    text=True,
  )
  if made.returncode != 0:
    pytest.skip(f'cannot mount a small tmpfs here: {made.stderr.strip()}')
  try:
    yield directory
  finally:  # lazily: a child process that filled it may still hold a file there
    subprocess.run(['umount', '-l', str(directory)], check=False)
