"""Pure train and eval steps.

`train_step(state, batch, rng)` and `eval_step(params, batch)` are module-level
pure functions; static pieces (the model, the schedule) are bound with
functools.partial and the result is jitted once with explicit shardings.
Steps return sums and their denominators, never means, so metrics from many
steps, devices or hosts add up exactly.
"""
import jax
import jax.numpy as jnp
import optax


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
  segment_ids; recurrent models take the previous carry (None = zeros) and the
  batch's `reset` rows, and return the next carry (a Transformer's is None)."""
  if getattr(model, 'recurrent', False):
    return model.apply({'params': params}, batch['inputs'], carry=carry,
                       reset=batch.get('reset'), **kwargs)
  logits = model.apply({'params': params}, batch['inputs'], positions=batch.get('positions'),
                       segment_ids=batch.get('segment_ids'), **kwargs)
  return logits, None


def loss_fn(params, model, batch, rng, deterministic: bool, carry=None,
            normalization: str = 'tokens'):
  """Mean loss per target token ('tokens'), or per row ('rows': summed over time
  and averaged over the rows, as Zaremba et al. train); aux: (sums, carry)."""
  logits, carry = apply_model(model, params, batch, carry, deterministic=deterministic,
                              rngs=None if deterministic else {'dropout': rng})
  losses, correct = token_losses(logits, batch['targets'])
  weights = batch['weights']
  weight_sum = jnp.sum(weights)
  loss_sum = jnp.sum(losses * weights)
  if normalization == 'tokens':
    loss = loss_sum / jnp.maximum(weight_sum, 1.0)
  elif normalization == 'rows':
    loss = loss_sum / weights.shape[0]
  else:
    raise ValueError(f"train.loss_normalization must be 'tokens' or 'rows'; got {normalization!r}")
  sums = {'loss_sum': loss_sum, 'correct_sum': jnp.sum(correct * weights),
          'weight_sum': weight_sum}
  return loss, (sums, carry)


def train_step(state, batch, rng, *, model, schedule, deterministic: bool,
               normalization: str = 'tokens'):
  """One optimizer step; returns the new state and metric sums. A state with a
  carry (recurrent model, carried rows) passes the new one to the next step."""
  rng = jax.random.fold_in(rng, state.step)  # A resumed run draws the same randomness.
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  (_, (sums, carry)), grads = grad_fn(state.params, model, batch, rng, deterministic,
                                      state.carry, normalization)
  new_state = state.apply_gradients(grads)
  if state.carry is not None:
    new_state = new_state.replace(carry=carry)
  metrics = dict(sums, grad_norm=optax.tree.norm(grads),
                 learning_rate=jnp.asarray(schedule(state.step), jnp.float32))
  return new_state, metrics


def eval_step(params, batch, carry, *, model, token_bytes):
  """(metric sums over a batch, carry); `token_bytes[id]` is the UTF-8 size of a token."""
  logits, carry = apply_model(model, params, batch, carry, deterministic=True)
  losses, correct = token_losses(logits, batch['targets'])
  weights = batch['weights']
  return {'loss_sum': jnp.sum(losses * weights), 'correct_sum': jnp.sum(correct * weights),
          'weight_sum': jnp.sum(weights),
          'byte_sum': jnp.sum(token_bytes[batch['targets']] * weights)}, carry
