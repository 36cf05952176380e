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
  """Per-token cross-entropy (nats) and correctness, computed in float32."""
  logits = logits.astype(jnp.float32)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return losses, correct


def apply_model(model, params, batch, **kwargs):
  """Logits for a batch; packed batches also carry positions and segment_ids."""
  return model.apply({'params': params}, batch['inputs'], positions=batch.get('positions'),
                     segment_ids=batch.get('segment_ids'), **kwargs)


def loss_fn(params, model, batch, rng, deterministic: bool):
  logits = apply_model(model, params, batch, deterministic=deterministic,
                       rngs=None if deterministic else {'dropout': rng})
  losses, correct = token_losses(logits, batch['targets'])
  weights = batch['weights']
  weight_sum = jnp.sum(weights)
  loss = jnp.sum(losses * weights) / jnp.maximum(weight_sum, 1.0)
  sums = {'loss_sum': jnp.sum(losses * weights), 'correct_sum': jnp.sum(correct * weights),
          'weight_sum': weight_sum}
  return loss, sums


def train_step(state, batch, rng, *, model, schedule, deterministic: bool):
  """One optimizer step; returns the new state and metric sums."""
  rng = jax.random.fold_in(rng, state.step)  # A resumed run draws the same randomness.
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  (_, sums), grads = grad_fn(state.params, model, batch, rng, deterministic)
  new_state = state.apply_gradients(grads)
  metrics = dict(sums, grad_norm=optax.tree.norm(grads),
                 learning_rate=jnp.asarray(schedule(state.step), jnp.float32))
  return new_state, metrics


def eval_step(params, batch, *, model, token_bytes):
  """Metric sums over a batch; `token_bytes[id]` is the UTF-8 size of a token."""
  logits = apply_model(model, params, batch, deterministic=True)
  losses, correct = token_losses(logits, batch['targets'])
  weights = batch['weights']
  return {'loss_sum': jnp.sum(losses * weights), 'correct_sum': jnp.sum(correct * weights),
          'weight_sum': jnp.sum(weights),
          'byte_sum': jnp.sum(token_bytes[batch['targets']] * weights)}
