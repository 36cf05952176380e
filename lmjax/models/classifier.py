"""Sequence classification: any model family's hidden states, pooled, then a
linear head over the classes.

The backbone is the language model itself (`head=False`), so its parameters
sit under 'backbone' with exactly the names a pre-training checkpoint holds,
and fine-tuning restores them as they are; only 'head' is new.
"""

import flax.linen as nn
import jax.numpy as jnp

from lmjax.models import layers
from lmjax.models import recurrent

POOLINGS = ('mean', 'first', 'last')


class Classifier(nn.Module):
  """Token ids [batch, length] (segment_ids 0 = padding) -> class logits [batch, classes].

  Pooling: 'mean' over a row's tokens (the encoder), 'first' token, or 'last'
  token (a causal decoder's or a recurrent model's summary of the whole row:
  for an LSTM, its final state)."""

  backbone: nn.Module  # a language model with a `config` (lmjax.models.model_config)
  num_classes: int
  pooling: str = 'mean'

  @nn.compact
  def __call__(self, tokens, positions=None, segment_ids=None, deterministic: bool = True):
    if self.pooling not in POOLINGS:
      raise ValueError(
        f'classify.pooling must be one of {", ".join(POOLINGS)} (or auto); got {self.pooling!r}'
      )
    c = self.backbone.config  # the head shares the backbone's dropout and dtypes
    if recurrent.is_recurrent(self.backbone):
      hidden, _ = self.backbone(tokens, deterministic=deterministic, head=False)
    else:
      hidden = self.backbone(tokens, positions, segment_ids, deterministic, head=False)
    # hidden: [batch, length, embed]
    valid = jnp.ones(tokens.shape, bool) if segment_ids is None else segment_ids > 0
    if self.pooling == 'mean':
      weights = valid.astype(hidden.dtype)[..., None]
      pooled = jnp.sum(hidden * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)
    elif self.pooling == 'first':
      pooled = hidden[:, 0]
    else:  # Rows are padded on the right: the last valid token.
      last = jnp.maximum(jnp.sum(valid, axis=1) - 1, 0)
      pooled = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
    pooled = nn.Dropout(c.dropout)(pooled, deterministic=deterministic)  # [batch, embed]
    logits = layers.Einsum(
      (pooled.shape[-1], self.num_classes),
      ('embed', 'classes'),
      'bd,dc->bc',
      dtype=c.dtype,
      param_dtype=c.param_dtype,
      name='head',
    )(pooled)
    bias = self.param(
      'head_bias',
      layers.partitioned(nn.initializers.zeros, ('classes',)),
      (self.num_classes,),
      c.param_dtype,
    )
    return (logits + bias).astype(jnp.float32)
