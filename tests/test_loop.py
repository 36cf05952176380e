"""The train loop as steps plus hooks: each hook at its own cadence, and the
profiler hook's trace on disk."""

import glob
import os

import pytest

from conftest import tiny_config
from lmjax import checkpoint
from lmjax import loop
from lmjax import metrics
from lmjax import train


def test_every_picks_multiples_and_the_last_step_as_asked():
  with_last = loop.every(3, last_step=8, at_last=True)
  without_last = loop.every(4, last_step=8, at_last=False)
  never = loop.every(0, last_step=8, at_last=False)
  assert [s for s in range(1, 9) if with_last(s)] == [3, 6, 8]
  assert [s for s in range(1, 9) if without_last(s)] == [4]
  assert not any(never(s) for s in range(1, 9))


@pytest.mark.slow
def test_hooks_run_at_their_cadence_and_the_profiler_traces_its_steps(corpus_dir, tmp_path, capsys):
  workdir = str(tmp_path / 'run')
  config = tiny_config(
    corpus_dir,
    **{
      'train.num_steps': 8,
      'train.log_every': 2,
      'train.eval_every': 4,
      'train.eval_batches': 1,
      'train.final_eval_batches': 1,
      'checkpoint.every': 3,
      'checkpoint.keep': 10,
      'checkpoint.keep_best': False,
      'train.profile_steps': 3,
      'sample.max_new_tokens': 0,
    },
  )
  train.train_and_evaluate(config, workdir)
  records = metrics.read_metrics(workdir)
  assert [r['step'] for r in records if 'train/loss' in r] == [2, 4, 6, 8]
  assert [r['step'] for r in records if 'eval/loss' in r] == [4]  # the last step's is final_eval
  assert [r['step'] for r in records if 'final_eval/loss' in r] == [8]
  assert 'perf/step_ms' in next(r for r in records if r['step'] == 4)
  manager = checkpoint.manager(workdir, read_only=True)
  assert sorted(manager.all_steps()) == [3, 6, 8]
  traces = glob.glob(os.path.join(workdir, 'tensorboard', 'plugins', 'profile', '*', '*.xplane.pb'))
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 1000
  assert 'step 4: profiled steps 2..4 into' in capsys.readouterr().out


def test_a_negative_profile_length_is_refused_before_any_io(corpus_dir, tmp_path):
  from lmjax import config as config_lib

  config = tiny_config(corpus_dir, **{'train.profile_steps': -1})
  with pytest.raises(config_lib.ConfigError, match='train.profile_steps must be a non-negative'):
    train.train_and_evaluate(config, str(tmp_path / 'never'))
  assert not (tmp_path / 'never').exists()
