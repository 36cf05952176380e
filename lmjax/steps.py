"""Pure train and eval steps.

`train_step(state, batch, rng)` and `eval_step(params, batch)` are module-level
pure functions; static pieces (the model, the schedule) are bound with
functools.partial and the result is jitted once with explicit shardings.
Steps return sums and their denominators, never means, so metrics from many
steps, devices or hosts add up exactly.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lmjax import models
from lmjax import sharding


def token_losses(logits, targets):
  """Per-token cross-entropy (nats) and correctness, computed in float32.

  One max over the vocabulary serves both the stable log-sum-exp and the
  accuracy (the target is correct when its logit is the maximum), instead of a
  separate argmax pass over the largest tensor of the step.
  """
  logits = logits.astype(jnp.float32)
  peak = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  log_sum = jnp.log(jnp.sum(jnp.exp(logits - peak), axis=-1)) + peak[..., 0]
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  correct = (picked >= peak[..., 0]).astype(jnp.float32)
  return log_sum - picked, correct


def apply_model(model, params, batch, carry=None, **kwargs):
  """(logits, carry) for a batch. Packed batches also carry positions and
  segment_ids; an encoder-decoder reads the encoder's rows (encoder_inputs,
  encoder_positions, encoder_segment_ids) too; recurrent models take the
  previous carry (None = zeros) and the batch's `reset` rows, and return the
  next carry (a Transformer's is None)."""
  if models.is_recurrent(model):
    return model.apply(
      {'params': params}, batch['inputs'], carry=carry, reset=batch.get('reset'), **kwargs
    )
  if models.is_encoder_decoder(model):
    kwargs.update(
      encoder_tokens=batch['encoder_inputs'],
      encoder_positions=batch.get('encoder_positions'),
      encoder_segment_ids=batch.get('encoder_segment_ids'),
    )
  logits = model.apply(
    {'params': params},
    batch['inputs'],
    positions=batch.get('positions'),
    segment_ids=batch.get('segment_ids'),
    **kwargs,
  )
  return logits, None


def _sums(model, params, batch, rng, deterministic: bool, carry, frozen=None, plan=None):
  """(loss_sum, (metric sums, carry)): the summed loss is what gets differentiated,
  so gradients from microbatches, devices and hosts add up exactly. With a
  fine-tuning `plan`, `params` are the trainable ones and the model runs on
  `plan.assemble(params, frozen)`."""
  if plan is not None:
    params = plan.assemble(params, frozen)
  logits, carry = apply_model(
    model,
    params,
    batch,
    carry,
    deterministic=deterministic,
    rngs=None if deterministic else {'dropout': rng},
  )
  losses, correct = token_losses(logits, batch['targets'])
  weights = batch['weights']
  sums = {
    'loss_sum': jnp.sum(losses * weights),
    'correct_sum': jnp.sum(correct * weights),
    'weight_sum': jnp.sum(weights),
  }
  return sums['loss_sum'], (sums, carry)


def _normalizer(sums, num_rows, normalization: str):
  """What the summed loss is divided by: the target tokens ('tokens'), or the
  rows ('rows': summed over time and averaged over rows, as Zaremba et al. train)."""
  if normalization == 'tokens':
    return jnp.maximum(sums['weight_sum'], 1.0)
  if normalization == 'rows':
    return jnp.asarray(num_rows, jnp.float32)
  raise ValueError(f"train.loss_normalization must be 'tokens' or 'rows'; got {normalization!r}")


def loss_fn(
  params, model, batch, rng, deterministic: bool, carry=None, normalization: str = 'tokens'
):
  """The normalised loss of one batch; aux: (sums, carry)."""
  loss_sum, (sums, carry) = _sums(model, params, batch, rng, deterministic, carry)
  return loss_sum / _normalizer(sums, batch['inputs'].shape[0], normalization), (sums, carry)


def _split(x, microbatches: int, axis: int = 0):
  """[..., rows, ...] -> [microbatches, ..., rows / microbatches, ...]: microbatch m
  takes every m-th row, so each holds an equal share of every data shard."""
  shape = x.shape[:axis] + (x.shape[axis] // microbatches, microbatches) + x.shape[axis + 1 :]
  x = jnp.moveaxis(x.reshape(shape), axis + 1, 0)
  names = (None,) * (axis + 1) + ('batch',) + (None,) * (x.ndim - axis - 2)
  return nn.with_logical_constraint(x, names)


def _merge(x, axis: int = 0):
  """Inverse of `_split`."""
  x = jnp.moveaxis(x, 0, axis + 1)
  return x.reshape(x.shape[:axis] + (-1,) + x.shape[axis + 2 :])


def _summed_gradients(
  params, model, batch, rng, deterministic, carry, microbatches, frozen=None, plan=None
):
  """Gradients of the summed loss, accumulated over `microbatches` inside the step."""
  grad_fn = functools.partial(jax.grad(_sums, argnums=1, has_aux=True), frozen=frozen, plan=plan)
  if microbatches == 1:
    return grad_fn(model, params, batch, rng, deterministic, carry)
  rows = batch['inputs'].shape[0]
  if rows % microbatches:
    raise ValueError(
      f'train.microbatches={microbatches} does not divide the {rows} rows of a batch'
    )
  split_batch = jax.tree.map(lambda x: _split(x, microbatches), batch)
  split_carry = None if carry is None else _split(carry, microbatches, axis=2)

  def body(accumulated, inputs):
    index, micro, micro_carry = inputs
    grads, (sums, new_carry) = grad_fn(
      model, params, micro, jax.random.fold_in(rng, index), deterministic, micro_carry
    )
    return jax.tree.map(jnp.add, accumulated, (grads, sums)), new_carry

  zeros = jax.tree.map(jnp.zeros_like, params)
  zero_sums = {k: jnp.zeros((), jnp.float32) for k in ('loss_sum', 'correct_sum', 'weight_sum')}
  (grads, sums), new_carry = jax.lax.scan(
    body, (zeros, zero_sums), (jnp.arange(microbatches), split_batch, split_carry)
  )
  return grads, (sums, None if carry is None else _merge(new_carry, axis=2))


def train_step(
  state,
  batch,
  rng,
  *,
  model,
  schedule,
  deterministic: bool,
  normalization: str = 'tokens',
  microbatches: int = 1,
  axis_name=None,
  plan=None,
):
  """One optimizer step; returns the new state and metric sums.

  Gradients of the summed loss are accumulated over `microbatches` (a lax.scan
  inside the step), summed over `axis_name` devices under pmap, and divided by
  the global normaliser once, so every layout of the same global batch takes
  the same step. A state with a carry (recurrent model, carried rows) passes
  the new one to the next step.
  """
  rng = jax.random.fold_in(rng, state.step)  # A resumed run draws the same randomness.
  grads, (sums, carry) = _summed_gradients(
    state.params, model, batch, rng, deterministic, state.carry, microbatches, state.frozen, plan
  )
  num_rows = batch['inputs'].shape[0]
  if axis_name is not None:  # pmap: every device's share of the global batch
    grads, sums = jax.lax.psum((grads, sums), axis_name)
    num_rows = jax.lax.psum(num_rows, axis_name)
  scale = 1.0 / _normalizer(sums, num_rows, normalization)
  grads = jax.tree.map(lambda g: g * scale, grads)
  new_state = state.apply_gradients(grads)
  if state.carry is not None:
    new_state = new_state.replace(carry=carry)
  metrics = dict(
    sums,
    grad_norm=optax.tree.norm(grads),
    learning_rate=jnp.asarray(schedule(state.step), jnp.float32),
  )
  return new_state, metrics


def eval_step(params, batch, carry, *, model, token_bytes):
  """(metric sums over a batch, carry); `token_bytes[id]` is the UTF-8 size of a token."""
  logits, carry = apply_model(model, params, batch, carry, deterministic=True)
  losses, correct = token_losses(logits, batch['targets'])
  weights = batch['weights']
  return {
    'loss_sum': jnp.sum(losses * weights),
    'correct_sum': jnp.sum(correct * weights),
    'weight_sum': jnp.sum(weights),
    'byte_sum': jnp.sum(token_bytes[batch['targets']] * weights),
  }, carry


# ----------------------------------------------------------------------------
# The one builder of the step a run trains with: lmjax.train, --compile_only,
# tools/bench.py and the tests all take it from here.

PARALLELISMS = ('mesh', 'pmap')


def make_train_step(config, model, schedule, plan=None):
  """`train_step` with every setting of `config` bound (dropout, loss
  normalization, microbatches, a LoRA plan): (state, batch, rng) -> (state, metrics)."""
  if config.parallelism not in PARALLELISMS:
    raise ValueError(f"parallelism must be 'mesh' or 'pmap'; got {config.parallelism!r}")
  return functools.partial(
    train_step,
    model=model,
    schedule=schedule,
    deterministic=config.model.dropout == 0.0,
    normalization=config.train.loss_normalization,
    microbatches=config.train.microbatches,
    plan=plan if plan is not None and plan.mode == 'lora' else None,
  )


class MeshStep:
  """The mesh path: one step jitted over global arrays with explicit shardings.

  Both paths offer the same three calls, so the loop, the save path and
  evaluation have no parallelism branch: `place(local)` turns this process'
  rows into the step's batch, `step(state, batch, rng)` trains, and
  `global_state(state)` gives the state as global arrays on the mesh (what
  checkpoints, evaluation and sampling take)."""

  def __init__(self, step_fn, state_shardings, mesh):
    self.mesh = mesh
    replicated = sharding.replicated(mesh)
    self.jitted = jax.jit(
      step_fn,
      in_shardings=(state_shardings, sharding.batch_sharding(mesh), replicated),
      out_shardings=(state_shardings, replicated),
      donate_argnums=0,
    )

  def place(self, local_batch: dict) -> dict:
    return sharding.make_global_batch(local_batch, self.mesh)

  def __call__(self, state, batch, rng):
    with sharding.rules_and_mesh(self.mesh):
      return self.jitted(state, batch, rng)

  def lower(self, state, batch, rng):
    with sharding.rules_and_mesh(self.mesh):
      return self.jitted.lower(state, batch, rng)

  def global_state(self, state):
    return state


class PmapStep:
  """The pmap path, a thin wrapper over the same step: the state replicated on
  this host's devices, each device a slice of the host's rows, gradients summed
  across all devices by `psum`."""

  def __init__(self, step_fn, state_shardings):
    self.devices = jax.local_devices()
    self.state_shardings = state_shardings
    self.pmapped = jax.pmap(
      functools.partial(step_fn, axis_name='devices'),
      axis_name='devices',
      in_axes=(0, 0, None),
      donate_argnums=0,
    )
    self.per_device = jax.sharding.NamedSharding(
      jax.sharding.Mesh(np.array(self.devices), ('devices',)), jax.sharding.PartitionSpec('devices')
    )

  def replicate(self, state):
    """A global (or host) state as one replica per local device."""
    count = len(self.devices)
    return jax.tree.map(
      lambda x: jax.device_put(np.broadcast_to(x, (count,) + np.shape(x)), self.per_device),
      sharding.host_copy(state),
    )

  def place(self, local_batch: dict) -> dict:
    count = len(self.devices)
    return {k: v.reshape(count, -1, *v.shape[1:]) for k, v in local_batch.items()}

  def __call__(self, state, batch, rng):
    state, metrics = self.pmapped(state, batch, rng)
    return state, jax.tree.map(lambda x: x[0], metrics)

  def lower(self, state, batch, rng):
    return self.pmapped.lower(state, batch, rng)

  def global_state(self, state):
    return jax.device_put(sharding.host_copy(state), self.state_shardings)


def build_train_step(
  config, model, schedule, state, state_shardings, mesh, plan=None, carry_rows: int = 0
):
  """(state, step) as `config.parallelism` runs them: the state as created, with a
  MeshStep; or the state replicated per device, with a PmapStep."""
  step_fn = make_train_step(config, model, schedule, plan)
  if config.parallelism != 'pmap':
    return state, MeshStep(step_fn, state_shardings, mesh)
  if carry_rows:
    raise ValueError(
      "parallelism='pmap' does not carry recurrent state: use the mesh "
      "path (parallelism='mesh') or train.carry_state=False"
    )
  step = PmapStep(step_fn, state_shardings)
  return step.replicate(state), step
