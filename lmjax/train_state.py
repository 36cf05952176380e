"""Train state, optimizer and learning-rate schedule from config (optax)."""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import PartitionSpec

from lmjax import models
from lmjax import sharding
from lmjax.models import recurrent
from lmjax.models import transformer

OPTIMIZERS = ('adamw', 'adam', 'sgd', 'rmsprop', 'adafactor')
SCHEDULES = ('constant', 'linear', 'cosine', 'rsqrt', 'epochs')


class TrainState(struct.PyTreeNode):
  """What a checkpoint holds: step, (trainable) parameters, optimizer state and,
  for a recurrent model trained on carried rows, the hidden state carried into
  the next step (None otherwise). `frozen` holds LoRA's pre-trained weights
  (lmjax.finetune): on the devices, never in a checkpoint."""

  step: jax.Array
  params: Any
  opt_state: Any
  tx: optax.GradientTransformation = struct.field(pytree_node=False)
  carry: Any = None
  frozen: Any = None

  def apply_gradients(self, grads) -> 'TrainState':
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
    params = optax.apply_updates(self.params, updates)
    return self.replace(step=self.step + 1, params=params, opt_state=opt_state)


def make_schedule(opt, num_steps: int, steps_per_epoch: int = 0) -> optax.Schedule:
  """Linear warm-up to the peak, then constant / linear / cosine / rsqrt decay;
  or 'epochs' (no warm-up): the peak for `decay_after_epochs` epochs, then
  times `decay_factor` at the start of every later epoch (Zaremba et al. 2014)."""
  peak, warmup, end = opt.learning_rate, max(0, opt.warmup_steps), opt.min_learning_rate
  decay_steps = max(1, num_steps - warmup)
  if opt.schedule == 'epochs':
    if steps_per_epoch <= 0:
      raise ValueError("optimizer.schedule='epochs' needs the steps per epoch of the data")

    def epochs(count):
      epoch = jnp.asarray(count) // steps_per_epoch  # 0-based
      decays = jnp.maximum(epoch + 1 - opt.decay_after_epochs, 0).astype(jnp.float32)
      return peak * jnp.asarray(opt.decay_factor, jnp.float32) ** decays

    return epochs
  if opt.schedule == 'constant':
    after = optax.constant_schedule(peak)
  elif opt.schedule == 'linear':
    after = optax.linear_schedule(peak, end, decay_steps)
  elif opt.schedule == 'cosine':
    after = optax.cosine_decay_schedule(peak, decay_steps, alpha=end / peak if peak else 0.0)
  elif opt.schedule == 'rsqrt':
    scale = max(1, warmup)
    after = lambda count: peak * jnp.sqrt(scale / (jnp.maximum(count, 0) + scale))
  else:
    raise ValueError(f'unknown optimizer.schedule {opt.schedule!r}; known: {", ".join(SCHEDULES)}')
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def decay_mask(params):
  """Weight decay applies to matrices only: norms' scales and biases are skipped
  (under scanned blocks, the leading layer axis does not count)."""

  def is_matrix(path, p):
    stacked = any(getattr(key, 'key', None) == transformer.SCANNED for key in path)
    return p.ndim - stacked >= 2

  return jax.tree_util.tree_map_with_path(is_matrix, params)


def make_optimizer(
  opt, num_steps: int, steps_per_epoch: int = 0
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  schedule = make_schedule(opt, num_steps, steps_per_epoch)
  if opt.name == 'adamw':
    core = optax.adamw(
      schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay, mask=decay_mask
    )
  elif opt.name == 'adafactor':
    core = optax.adafactor(
      schedule, weight_decay_rate=opt.weight_decay or None, weight_decay_mask=decay_mask
    )
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


def carry_rows(config, model) -> int:
  """Rows of hidden state a run carries from step to step: the global batch for a
  recurrent model trained on the `stream` layout with train.carry_state, else 0."""
  if models.is_recurrent(model) and config.data.layout == 'stream' and config.train.carry_state:
    return config.train.batch_size
  return 0


def _init_fn(model, tx, sample_tokens, carry_rows: int, plan=None) -> Callable:
  """rng (, pre-trained parameters) -> the initial TrainState. Fine-tuning puts
  the pre-trained tree at the plan's prefix, then splits off what is frozen."""

  def init(rng, pretrained=None):
    params = nn.unbox(model.init({'params': rng}, sample_tokens)['params'])
    frozen = None
    if plan is not None:
      params = plan.place_pretrained(params, pretrained)
      params, frozen = plan.split_values(params, jax.random.fold_in(rng, 1))
    carry = recurrent.initial_carry(model, carry_rows) if carry_rows else None
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=tx.init(params),
      tx=tx,
      carry=carry,
      frozen=frozen,
    )

  return init


def _specs_like_params(opt_state, params, param_specs):
  """Optimizer-state leaves shaped like a parameter (Adam's moments, ...) take its
  logical spec, matched by path suffix and shape; the rest (counts, Adafactor's
  factored moments) are replicated."""
  by_path = {}
  for (path, leaf), spec in zip(
    jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(param_specs, is_leaf=_is_spec)
  ):
    by_path[tuple(path)] = (leaf.shape, spec)

  def spec_of(path, leaf):
    for start in range(len(path)):
      shape_and_spec = by_path.get(tuple(path[start:]))
      if shape_and_spec and shape_and_spec[0] == leaf.shape:
        return shape_and_spec[1]
    return PartitionSpec()

  return jax.tree_util.tree_map_with_path(spec_of, opt_state)


def _is_spec(x) -> bool:
  return isinstance(x, PartitionSpec)


def params_and_specs(model, seq_len: int):
  sample = jnp.zeros((1, seq_len), jnp.int32)
  boxed_params = jax.eval_shape(
    lambda rng: model.init({'params': rng}, sample)['params'], jax.random.key(0)
  )
  return nn.unbox(boxed_params), nn.get_partition_spec(boxed_params)


def abstract_params(model, seq_len: int, mesh, plan=None):
  """The parameters alone, abstract, with their shardings on `mesh` (for evaluation
  and sampling, which never read the optimizer state); with a LoRA `plan`, the
  trainable ones a checkpoint holds."""
  params, specs = params_and_specs(model, seq_len)
  if plan is not None:
    params, specs, _, _ = plan.split_abstract(params, specs)
  return _placed(params, sharding.logical_to_sharding(specs, mesh))


def _placed(abstract, shardings):
  return jax.tree.map(
    lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s), abstract, shardings
  )


def abstract_state(model, tx, seq_len: int, mesh, carry_rows: int = 0, plan=None):
  """(abstract state, its NamedShardings), without allocating anything.
  `carry_rows` > 0 gives the state a recurrent model's carry for that many rows;
  a LoRA `plan` (lmjax.finetune) splits the parameters into trainable and frozen."""
  params, param_specs = params_and_specs(model, seq_len)
  frozen = frozen_specs = None
  if plan is not None:
    params, param_specs, frozen, frozen_specs = plan.split_abstract(params, param_specs)
  carry = carry_spec = None
  if carry_rows:
    carry = jax.ShapeDtypeStruct(recurrent.carry_shape(model, carry_rows), jnp.float32)
    carry_spec = PartitionSpec(*recurrent.CARRY_AXES)
  abstract = TrainState(
    step=jax.ShapeDtypeStruct((), jnp.int32),
    params=params,
    opt_state=jax.eval_shape(tx.init, params),
    tx=tx,
    carry=carry,
    frozen=frozen,
  )
  specs = abstract.replace(
    step=PartitionSpec(),
    params=param_specs,
    opt_state=_specs_like_params(abstract.opt_state, params, param_specs),
    carry=carry_spec,
    frozen=frozen_specs,
  )
  shardings = sharding.logical_to_sharding(specs, mesh)
  return _placed(abstract, shardings), shardings


def create_state(
  model, tx, seq_len: int, shardings, rng, carry_rows: int = 0, plan=None, pretrained=None
):
  """The initial state, created directly in `shardings` (from `abstract_state`);
  fine-tuning passes its `plan` and the `pretrained` parameters."""
  init = _init_fn(model, tx, jnp.zeros((1, seq_len), jnp.int32), carry_rows, plan)
  # No mesh context here: out_shardings places every leaf, and flax's DenseGeneral
  # would apply its kernel's constraint to the flattened kernel under one.
  return jax.jit(init, out_shardings=shardings)(rng, pretrained)
