"""Evaluation loops over a split: loss, perplexity, bits per byte and token
accuracy of a language model, every token once (the classifier's loop, whose
metrics need every example, is in lmjax.tasks)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from lmjax import cpu_host
from lmjax import data as data_layer
from lmjax import metrics as metrics_lib
from lmjax import sharding
from lmjax import steps
from lmjax import watchdog
from lmjax.models import recurrent

# The data layer (TensorFlow) loads when a task first reads data.
pipeline = data_layer.lazy('lmjax.data.pipeline')


def make_eval_fn(model, tokenizer, param_shardings, mesh):
  """A jitted eval step for `model`: (params, batch, carry) -> (metric sums, carry)."""
  token_bytes = np.zeros(model.config.vocab_size, np.int32)
  token_bytes[: tokenizer.vocab_size] = tokenizer.token_bytes()
  step = functools.partial(steps.eval_step, model=model, token_bytes=jnp.asarray(token_bytes))
  batch_sharding = sharding.batch_sharding(mesh)
  carry_sharding = sharding.logical_to_sharding(PartitionSpec(*recurrent.CARRY_AXES), mesh)
  return jax.jit(
    step,
    in_shardings=(param_shardings, batch_sharding, carry_sharding),
    out_shardings=(sharding.replicated(mesh), carry_sharding),
  )


def evaluate(
  eval_fn,
  params,
  stream: pipeline.TokenStream,
  seq_len: int,
  batch_size: int,
  mesh,
  max_batches: int = -1,
  layout: str = 'windows',
  model=None,
  carry: bool = False,
  masking: pipeline.Masking | None = None,
  seed: int = 0,
) -> dict:
  """Metrics over the split (or its first `max_batches` batches), every token once.
  With `carry`, a recurrent `model` carries its state from batch to batch over
  the split's contiguous rows (the standard protocol for stateful models). With
  `masking` (the masked-LM objective), the metrics are those of the masked
  positions, drawn the same way in every evaluation."""
  state = recurrent.initial_carry(model, batch_size) if carry else None
  batches = pipeline.eval_batches(
    stream,
    seq_len,
    batch_size,
    max_batches,
    jax.process_index(),
    jax.process_count(),
    layout,
    masking,
    seed,
  )
  return evaluate_batches(eval_fn, params, batches, mesh, state)


def evaluate_batches(eval_fn, params, batches, mesh, state=None) -> dict:
  """The metrics of `eval_fn` summed over this process' local `batches`; a
  recurrent model's `state` (None: none carried) goes from batch to batch."""
  totals = None
  with sharding.rules_and_mesh(mesh):
    for local in batches:
      sums, new_state = cpu_host.settle(
        eval_fn(params, sharding.make_global_batch(local, mesh), state)
      )
      if state is not None:
        state = new_state
      totals = sums if totals is None else cpu_host.settle(jax.tree.map(jnp.add, totals, sums))
      watchdog.beat()
  return metrics_lib.summarize(jax.device_get(totals))
