"""Learning rate and dropout for nanoGPT's baby Shakespeare run
(configs/shakespeare_char.py: 4 layers, width 128, characters), by TPE with
median pruning. Trial 0 runs the config's own values (lr 1e-3, dropout 0), so
the sweep measures what it improves on, at equal steps.

  python -m lmjax.sweep --sweep configs/sweeps/shakespeare_char.py --dir sweeps/sc \
      --set data.manual_dir=DIR_WITH_INPUT_TXT

Each trial trains 1,000 steps (half the config's 2,000, to fit 16 trials in
about ten minutes on 2 CPU cores with --workers 2), evaluating every 250 on
the whole validation split.
"""

from lmjax import sweep


def get_sweep():
  return sweep.Sweep(
    config='configs/shakespeare_char.py',
    overrides={
      'train.num_steps': 1000,
      'train.eval_every': 250,
      'checkpoint.every': 250,
      'sample.max_new_tokens': 0,
    },
    space={
      'optimizer.learning_rate': sweep.Float(1e-4, 1e-2, log=True),
      'model.dropout': sweep.Float(0.0, 0.3),
    },
    objective='eval/loss',
    direction='minimize',
    sampler='tpe',
    pruner='median',
    startup_trials=3,
    prune_after_steps=500,  # a trial is judged on its evaluations at 500 and 750
    sampler_startup_trials=6,
    trials=16,
    seed=0,
  )
