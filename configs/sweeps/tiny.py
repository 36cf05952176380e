"""A sweep small enough for CI: learning rate x depth x dropout on a tiny model of
the embedded default corpus (configs/default.py, shrunk), one hopeless learning
rate among the choices for the median pruner to stop.

  python -m lmjax.sweep --sweep configs/sweeps/tiny.py --dir /tmp/sweep_tiny

The grid has 8 points (2 x 2 x 2); the budget runs 4 of them, in the grid
sampler's seeded order. A trial trains 120 steps (about 15 s on 2 CPU cores),
evaluating every 40.
"""

from lmjax import sweep


def get_sweep():
  return sweep.Sweep(
    config='configs/default.py',
    overrides={
      'model.embed_dim': 64,
      'model.num_heads': 2,
      'data.seq_len': 64,
      'train.batch_size': 8,
      'train.num_steps': 120,
      'train.log_every': 40,
      'train.eval_every': 40,
      'train.eval_batches': 2,
      'train.final_eval_batches': 4,
      'checkpoint.every': 40,
      'optimizer.warmup_steps': 10,
      'sample.max_new_tokens': 0,
    },
    space={
      'optimizer.learning_rate': sweep.Categorical((3e-3, 1e-6)),  # 1e-6 learns nothing
      'model.num_layers': sweep.Categorical((1, 2)),
      'model.dropout': sweep.Categorical((0.0, 0.1)),
    },
    objective='eval/loss',
    direction='minimize',
    sampler='grid',
    pruner='median',
    startup_trials=1,
    trials=4,
    seed=0,
  )
