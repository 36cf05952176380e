"""Config files, overrides and their errors."""

import json
import subprocess
import sys

import pytest

from conftest import REPO
from lmjax import config as config_lib

CONFIG_FILES = sorted(p.stem for p in (REPO / 'configs').glob('*.py') if not p.stem.startswith('_'))


@pytest.mark.parametrize(
  'name', CONFIG_FILES + ['classify.py:imdb', 'classify.py:ag_news', 'classify.py:sst2']
)
def test_config_files_load_and_have_only_known_keys(name, tmp_path):
  path, _, arg = name.partition(':')
  path = path if path.endswith('.py') else f'{path}.py'
  if path == 'finetune_hf.py':  # its argument is an imported run (lmjax.hf import)
    config_lib.save(config_lib.base_config(), str(tmp_path))
    arg = str(tmp_path)
  config = config_lib.load_config_file(str(REPO / 'configs' / path) + (f':{arg}' if arg else ''))
  base = config_lib.base_config()
  assert set(config.keys()) == set(base.keys())
  for section in base.keys():
    if hasattr(base[section], 'keys'):
      assert set(config[section].keys()) == set(base[section].keys()), section


def test_shakespeare_char_matches_nanogpt_baby_run():
  c = config_lib.load_config_file(str(REPO / 'configs' / 'shakespeare_char.py'))
  assert (c.model.num_layers, c.model.num_heads, c.model.embed_dim) == (4, 4, 128)
  assert (c.data.seq_len, c.train.batch_size, c.train.num_steps) == (64, 12, 2000)
  assert (c.optimizer.learning_rate, c.optimizer.b2, c.optimizer.warmup_steps) == (1e-3, 0.99, 100)
  assert (c.optimizer.min_learning_rate, c.optimizer.weight_decay) == (1e-4, 0.1)
  assert (c.optimizer.grad_clip, c.model.dropout, c.train.eval_every) == (1.0, 0.0, 250)


def test_unknown_key_names_the_valid_ones():
  config = config_lib.base_config()
  with pytest.raises(config_lib.ConfigError) as error:
    config_lib.check_key_path(config, 'model.num_layer')
  message = str(error.value)
  assert "'num_layer' is not in model" in message and 'num_layers' in message
  assert 'embed_dim' in message
  with pytest.raises(
    config_lib.ConfigError,
    match='valid keys there: checkpoint, classify, compilation_cache_dir, cpu_devices, data',
  ):
    config_lib.check_key_path(config, 'modle.num_layers')
  with pytest.raises(config_lib.ConfigError, match='is a value, not a section'):
    config_lib.check_key_path(config, 'seed.x')
  config_lib.check_key_path(config, 'optimizer.b2')  # A valid key passes.


def test_check_overrides_reads_the_config_file_from_argv():
  argv = ['--config', str(REPO / 'configs' / 'default.py'), '--config.train.num_stepz=3']
  with pytest.raises(config_lib.ConfigError, match='num_steps'):
    config_lib.check_overrides(argv)
  config_lib.check_overrides([f'--config={REPO}/configs/default.py', '--config.seed=3'])


def train_default_config(workdir, *overrides):
  """`python -m lmjax.train` on configs/default.py (in a subprocess)."""
  command = [sys.executable, '-m', 'lmjax.train', '--config', str(REPO / 'configs' / 'default.py')]
  return subprocess.run(
    [*command, '--workdir', str(workdir), *overrides],
    capture_output=True,
    text=True,
    timeout=120,
    cwd=REPO,
  )


def test_train_command_rejects_a_typo_before_running(tmp_path):
  workdir = tmp_path / 'run'
  result = train_default_config(workdir, '--config.model.num_layer=2')
  assert result.returncode != 0
  assert "unknown config key 'model.num_layer'" in result.stderr
  assert 'num_layers' in result.stderr
  assert not workdir.exists()  # Nothing ran.


def test_config_round_trips_through_json(tmp_path):
  config = config_lib.load_config_file(str(REPO / 'configs' / 'default.py'))
  path = config_lib.save(config, str(tmp_path))
  with open(path) as f:
    restored = config_lib.from_json(f.read())
  assert restored.to_dict() == config.to_dict()
  assert json.loads(config_lib.to_json(config))['model']['embed_dim'] == config.model.embed_dim


@pytest.mark.parametrize(
  'field, value, message',
  [
    ('model.norm', 'rmsnrm', "model.norm must be one of layernorm, rmsnorm; got 'rmsnrm'"),
    ('model.mlp', 'relu', "model.mlp must be one of gelu, gelu_exact, swiglu; got 'relu'"),
    ('model.positions', 'alibi', "model.positions must be one of learned, rope; got 'alibi'"),
    ('classify.pooling', 'max', 'classify.pooling must be one of auto, mean, first, last'),
    ('data.layout', 'rows', "data.layout must be one of windows, packed, stream; got 'rows'"),
    ('optimizer.name', 'lion', 'optimizer.name must be one of adamw, adam, sgd'),
    ('tokenizer.kind', 'bpe', 'tokenizer.kind must be one of bytes, chars, words, sentencepiece'),
    ('train.batch_size', 0, 'train.batch_size must be a positive integer; got 0'),
    ('model.num_heads', 3, 'model.embed_dim=128 is not divisible by model.num_heads=3'),
    ('model.dropout', 1.5, r'model.dropout must be in \[0, 1\)'),
  ],
)
def test_every_choice_is_checked_before_anything_runs(field, value, message):
  from lmjax import validation

  config = config_lib.base_config()
  config_lib.check_key_path(config, field)
  section, key = field.split('.')
  config[section][key] = value
  with pytest.raises(config_lib.ConfigError, match=message):
    validation.check(config)


@pytest.mark.slow
def test_a_bad_choice_stops_the_train_command_before_any_io(tmp_path):
  # It used to surface only when the model was traced, after both splits were
  # tokenized (and sentencepiece maybe trained).
  workdir = tmp_path / 'run'
  result = train_default_config(workdir, '--config.model.norm=rmsnrm')
  assert result.returncode == 1
  errors = [line for line in result.stderr.splitlines() if line.startswith('error:')]
  assert errors == ["error: model.norm must be one of layernorm, rmsnorm; got 'rmsnrm'"]
  assert not workdir.exists() and 'corpus' not in result.stdout  # nothing was read
