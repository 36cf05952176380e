"""Transformer language models (pre-norm): the causal decoder (next-token LM)
and, with family 'encoder', the bidirectional encoder (masked LM): one module,
the same blocks, only the attention mask differs. Both read their settings
from one `model_config.ModelConfig`."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from lmjax.models import layers
from lmjax.models import model_config

# Activation checkpointing of whole blocks: what the backward pass may keep.
POSITIONS = ('learned', 'rope')  # model.positions
REMAT_POLICIES = {
  'none': None,
  'full': None,
  'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Block(nn.Module):
  """Pre-norm residual block: x + attention(norm(x)), then x + mlp(norm(x))."""

  config: model_config.ModelConfig

  @nn.compact
  def __call__(self, x, positions, segment_ids, deterministic: bool, decode: bool = False):
    c = self.config  # x: [batch, length, embed]
    kinds = dict(dtype=c.dtype, param_dtype=c.param_dtype)
    # Residual projections are scaled down by depth (GPT-2).
    out_init_scale = 1.0 / math.sqrt(2 * c.num_layers)
    attention = layers.SelfAttention(
      c.num_heads,
      causal=c.causal,
      use_rope=c.positions == 'rope',
      out_init_scale=out_init_scale,
      cache_len=c.max_len,
      name='attention',
      **kinds,
    )
    h = attention(
      layers.Norm(c.norm, name='attention_norm', **kinds)(x), positions, segment_ids, decode
    )
    x = x + nn.Dropout(c.dropout)(h, deterministic=deterministic)
    mlp = layers.Mlp(
      c.mlp_hidden_dim, kind=c.mlp, out_init_scale=out_init_scale, name='mlp', **kinds
    )
    h = mlp(layers.Norm(c.norm, name='mlp_norm', **kinds)(x))
    x = x + nn.Dropout(c.dropout)(h, deterministic=deterministic)
    return nn.with_logical_constraint(x, ('batch', 'length', 'embed'))


class TransformerLM(nn.Module):
  """Token ids [batch, length] -> next-token logits [batch, length, vocab].

  Packed rows pass `positions` (restarting at each document) and `segment_ids`
  (attention stays within a segment). `decode=True` runs one token per row at
  `positions` [batch, 1] against a key/value cache of the last `max_len` tokens
  (the mutable 'cache' collection): generation without recomputation.

  `config.family='encoder'` makes it a bidirectional encoder (every token sees
  the whole segment): the masked-LM objective and sequence classification.
  `head=False` returns the final hidden states [batch, length, embed] instead of
  logits (the backbone of a classifier)."""

  config: model_config.ModelConfig

  @nn.compact
  def __call__(
    self,
    tokens,
    positions=None,
    segment_ids=None,
    deterministic: bool = True,
    decode: bool = False,
    head: bool = True,
  ):
    c = self.config
    if c.positions not in POSITIONS:
      raise ValueError(f"model.positions must be 'learned' or 'rope', got {c.positions!r}")
    batch, length = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    embed = nn.Embed(
      c.vocab_size,
      c.embed_dim,
      dtype=c.dtype,
      param_dtype=c.param_dtype,
      name='embed',
      embedding_init=layers.partitioned(layers.default_init, ('vocab', 'embed')),
    )
    x = embed(tokens)  # [batch, length, embed]
    if c.positions == 'learned':
      position_table = nn.Embed(
        c.max_len,
        c.embed_dim,
        dtype=c.dtype,
        param_dtype=c.param_dtype,
        name='position_embed',
        embedding_init=layers.partitioned(layers.default_init, ('length', 'embed')),
      )
      x = x + position_table(positions)
    x = nn.Dropout(c.dropout)(x, deterministic=deterministic)
    x = nn.with_logical_constraint(x, ('batch', 'length', 'embed'))
    if c.remat not in REMAT_POLICIES:
      raise ValueError(f'model.remat must be one of {", ".join(REMAT_POLICIES)}; got {c.remat!r}')
    block = (
      Block
      if c.remat == 'none'
      else nn.remat(  # deterministic, decode are static
        Block, policy=REMAT_POLICIES[c.remat], static_argnums=(4, 5)
      )
    )
    for i in range(c.num_layers):
      x = block(c, name=f'block_{i}')(x, positions, segment_ids, deterministic, decode)
    x = layers.Norm(c.norm, dtype=c.dtype, param_dtype=c.param_dtype, name='final_norm')(x)
    if not head:
      return x
    if c.tie_embeddings:
      logits = embed.attend(x)
    else:
      logits = layers.Einsum(
        (c.embed_dim, c.vocab_size),
        ('embed', 'vocab'),
        'bld,dv->blv',
        dtype=c.dtype,
        param_dtype=c.param_dtype,
        name='unembed',
      )(x)
    return nn.with_logical_constraint(logits, ('batch', 'length', 'vocab'))
