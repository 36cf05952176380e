"""Transformer language models (pre-norm): the causal decoder (next-token LM)
and, with `causal=False`, the bidirectional encoder (masked LM): one module,
the same blocks, only the attention mask differs."""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lmjax.models import layers

# Activation checkpointing of whole blocks: what the backward pass may keep.
POSITIONS = ('learned', 'rope')  # model.positions
REMAT_POLICIES = {
  'none': None,
  'full': None,
  'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Block(nn.Module):
  """Pre-norm residual block: x + attention(norm(x)), then x + mlp(norm(x))."""

  num_heads: int
  causal: bool
  mlp_dim: int
  mlp: str
  norm: str
  use_rope: bool
  dropout: float
  out_init_scale: float
  cache_len: int
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x, positions, segment_ids, deterministic: bool, decode: bool = False):
    kinds = dict(dtype=self.dtype, param_dtype=self.param_dtype)  # x: [batch, length, embed]
    attention = layers.SelfAttention(
      self.num_heads,
      causal=self.causal,
      use_rope=self.use_rope,
      out_init_scale=self.out_init_scale,
      cache_len=self.cache_len,
      name='attention',
      **kinds,
    )
    h = attention(
      layers.Norm(self.norm, name='attention_norm', **kinds)(x), positions, segment_ids, decode
    )
    x = x + nn.Dropout(self.dropout)(h, deterministic=deterministic)
    mlp = layers.Mlp(
      self.mlp_dim, kind=self.mlp, out_init_scale=self.out_init_scale, name='mlp', **kinds
    )
    h = mlp(layers.Norm(self.norm, name='mlp_norm', **kinds)(x))
    x = x + nn.Dropout(self.dropout)(h, deterministic=deterministic)
    return nn.with_logical_constraint(x, ('batch', 'length', 'embed'))


class TransformerLM(nn.Module):
  """Token ids [batch, length] -> next-token logits [batch, length, vocab].

  Packed rows pass `positions` (restarting at each document) and `segment_ids`
  (attention stays within a segment). `decode=True` runs one token per row at
  `positions` [batch, 1] against a key/value cache of the last `max_len` tokens
  (the mutable 'cache' collection): generation without recomputation.

  `causal=False` makes it a bidirectional encoder (every token sees the whole
  segment): the masked-LM objective and sequence classification. `head=False`
  returns the final hidden states [batch, length, embed] instead of logits
  (the backbone of a classifier)."""

  vocab_size: int
  max_len: int
  num_layers: int = 4
  num_heads: int = 4
  embed_dim: int = 128
  mlp_dim: int = 0
  mlp: str = 'gelu'
  positions: str = 'learned'
  norm: str = 'layernorm'
  dropout: float = 0.0
  tie_embeddings: bool = True
  remat: str = 'none'
  causal: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def hidden_dim(self) -> int:
    if self.mlp_dim:
      return self.mlp_dim
    if self.mlp == 'swiglu':  # Same parameter count as a 4x GELU MLP.
      return int(8 * self.embed_dim / 3 + 63) // 64 * 64
    return 4 * self.embed_dim

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
    if self.positions not in POSITIONS:
      raise ValueError(f"model.positions must be 'learned' or 'rope', got {self.positions!r}")
    batch, length = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    embed = nn.Embed(
      self.vocab_size,
      self.embed_dim,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name='embed',
      embedding_init=layers.partitioned(layers.default_init, ('vocab', 'embed')),
    )
    x = embed(tokens)  # [batch, length, embed]
    if self.positions == 'learned':
      position_table = nn.Embed(
        self.max_len,
        self.embed_dim,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name='position_embed',
        embedding_init=layers.partitioned(layers.default_init, ('length', 'embed')),
      )
      x = x + position_table(positions)
    x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
    x = nn.with_logical_constraint(x, ('batch', 'length', 'embed'))
    if self.remat not in REMAT_POLICIES:
      raise ValueError(
        f'model.remat must be one of {", ".join(REMAT_POLICIES)}; got {self.remat!r}'
      )
    block = (
      Block
      if self.remat == 'none'
      else nn.remat(  # deterministic, decode are static
        Block, policy=REMAT_POLICIES[self.remat], static_argnums=(4, 5)
      )
    )
    for i in range(self.num_layers):
      x = block(
        num_heads=self.num_heads,
        causal=self.causal,
        mlp_dim=self.hidden_dim(),
        mlp=self.mlp,
        norm=self.norm,
        use_rope=self.positions == 'rope',
        dropout=self.dropout,
        out_init_scale=1.0 / math.sqrt(2 * self.num_layers),
        cache_len=self.max_len,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name=f'block_{i}',
      )(x, positions, segment_ids, deterministic, decode)
    x = layers.Norm(self.norm, dtype=self.dtype, param_dtype=self.param_dtype, name='final_norm')(x)
    if not head:
      return x
    if self.tie_embeddings:
      logits = embed.attend(x)
    else:
      logits = layers.Einsum(
        (self.embed_dim, self.vocab_size),
        ('embed', 'vocab'),
        'bld,dv->blv',
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name='unembed',
      )(x)
    return nn.with_logical_constraint(logits, ('batch', 'length', 'vocab'))
