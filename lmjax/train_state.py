"""Train state, optimizer and learning-rate schedule from config (optax)."""
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from lmjax import sharding

OPTIMIZERS = ('adamw', 'adam', 'sgd', 'rmsprop', 'adafactor')
SCHEDULES = ('constant', 'linear', 'cosine', 'rsqrt')


class TrainState(struct.PyTreeNode):
  """What a checkpoint holds: step, parameters and optimizer state."""
  step: jax.Array
  params: Any
  opt_state: Any
  tx: optax.GradientTransformation = struct.field(pytree_node=False)

  def apply_gradients(self, grads) -> 'TrainState':
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
    params = optax.apply_updates(self.params, updates)
    return self.replace(step=self.step + 1, params=params, opt_state=opt_state)


def make_schedule(opt, num_steps: int) -> optax.Schedule:
  """Linear warm-up to the peak, then constant / linear / cosine / rsqrt decay."""
  peak, warmup, end = opt.learning_rate, max(0, opt.warmup_steps), opt.min_learning_rate
  decay_steps = max(1, num_steps - warmup)
  if opt.schedule == 'constant':
    after = optax.constant_schedule(peak)
  elif opt.schedule == 'linear':
    after = optax.linear_schedule(peak, end, decay_steps)
  elif opt.schedule == 'cosine':
    after = optax.cosine_decay_schedule(peak, decay_steps, alpha=end / peak if peak else 0.0)
  elif opt.schedule == 'rsqrt':
    scale = max(1, warmup)
    after = lambda count: peak * jnp.sqrt(scale / (count + scale))
  else:
    raise ValueError(f'unknown optimizer.schedule {opt.schedule!r}; known: {", ".join(SCHEDULES)}')
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def decay_mask(params):
  """Weight decay applies to matrices only: norms' scales and biases are skipped."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(opt, num_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  schedule = make_schedule(opt, num_steps)
  if opt.name == 'adamw':
    core = optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                       weight_decay=opt.weight_decay, mask=decay_mask)
  elif opt.name == 'adafactor':
    core = optax.adafactor(schedule, weight_decay_rate=opt.weight_decay or None,
                           weight_decay_mask=decay_mask)
  else:
    if opt.name == 'adam':
      core = optax.adam(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps)
    elif opt.name == 'sgd':
      core = optax.sgd(schedule, momentum=opt.momentum or None, nesterov=opt.nesterov)
    elif opt.name == 'rmsprop':
      core = optax.rmsprop(schedule, decay=opt.b2, eps=opt.eps, momentum=opt.momentum or None)
    else:
      raise ValueError(f'unknown optimizer.name {opt.name!r}; known: {", ".join(OPTIMIZERS)}')
    if opt.weight_decay:  # Coupled (L2) decay, before the adaptive scaling.
      core = optax.chain(optax.add_decayed_weights(opt.weight_decay, mask=decay_mask), core)
  if opt.grad_clip > 0:
    core = optax.chain(optax.clip_by_global_norm(opt.grad_clip), core)
  return core, schedule


def _init_fn(model, tx, sample_tokens) -> Callable:
  def init(rng):
    variables = model.init({'params': rng}, sample_tokens)
    params = variables['params']
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params), tx=tx)
  return init


def abstract_state(model, tx, seq_len: int, mesh):
  """(abstract unboxed state, its NamedShardings), without allocating anything."""
  sample = jnp.zeros((1, seq_len), jnp.int32)
  boxed = jax.eval_shape(_init_fn(model, tx, sample), jax.random.key(0))
  specs = nn.get_partition_spec(boxed)
  shardings = sharding.logical_to_sharding(specs, mesh)
  unboxed = nn.unbox(boxed)
  abstract = jax.tree.map(lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s),
                          unboxed, shardings)
  return abstract, shardings


def create_state(model, tx, seq_len: int, mesh, rng):
  """The initial state, created directly in its sharded layout."""
  _, shardings = abstract_state(model, tx, seq_len, mesh)
  init = _init_fn(model, tx, jnp.zeros((1, seq_len), jnp.int32))
  with sharding.rules_and_mesh(mesh):
    state = jax.jit(lambda key: nn.unbox(init(key)), out_shardings=shardings)(rng)
  return state, shardings
