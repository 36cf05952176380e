"""Building blocks shared by every model family.

Every parameter carries logical axis names (see lmjax.sharding) and every
module keeps `dtype` (compute) apart from `param_dtype` (storage).
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

NORMS = ('layernorm', 'rmsnorm')  # model.norm
MLPS = ('gelu', 'swiglu')  # model.mlp

Dtype = Any
default_init = nn.initializers.normal(stddev=0.02)


def materialize(x):
  """`x`, computed into memory before any consumer reads it.

  XLA:CPU fuses elementwise producers into their consumers; when a consumer is
  a transpose (as for a weight gradient), the elementwise work then runs in
  transposed, unvectorised order, several times slower. XLA:CPU drops
  optimization barriers, but not a conditional on a runtime value. The other
  branch only runs when x already holds NaN, and then says so.
  """
  probe = x.reshape(-1)[0]
  return jax.lax.cond(probe == probe, lambda v: v, lambda v: jnp.full_like(v, jnp.nan), x)


@jax.custom_vjp
def _gelu_cpu(x):
  return nn.gelu(x, approximate=True)


def _gelu_cpu_forward(x):
  return nn.gelu(x, approximate=True), x


def _gelu_cpu_backward(x, g):
  _, vjp = jax.vjp(lambda y: nn.gelu(y, approximate=True), x)
  return (materialize(vjp(g)[0]),)


_gelu_cpu.defvjp(_gelu_cpu_forward, _gelu_cpu_backward)


def gelu(x):
  """tanh-approximated GELU. On CPU its backward recomputes tanh from the saved
  input rather than saving tanh's output (less memory traffic, which bounds this
  op on CPU), and materialises the input gradient (see `materialize`)."""
  if jax.default_backend() == 'cpu':
    return _gelu_cpu(x)
  return nn.gelu(x, approximate=True)


def partitioned(init, names):
  return nn.with_logical_partitioning(init, names)


class Einsum(nn.Module):
  """A projection `einsum(equation, x, kernel)` with a kernel of any rank.

  The kernel is created at its true shape with its logical axis names (flax's
  DenseGeneral flattens multi-axis kernels, which breaks their constraints
  under a mesh).
  """

  shape: tuple
  names: tuple
  equation: str
  init_scale: float = 1.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.normal(stddev=0.02 * self.init_scale)
    kernel = self.param('kernel', partitioned(init, self.names), self.shape, self.param_dtype)
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    return jnp.einsum(self.equation, x, kernel)


class Norm(nn.Module):
  """LayerNorm or RMSNorm over the last axis, computed in float32."""

  kind: str = 'layernorm'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale_init = partitioned(nn.initializers.ones, ('embed',))
    if self.kind == 'layernorm':
      norm = nn.LayerNorm(
        epsilon=1e-5,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        scale_init=scale_init,
        bias_init=partitioned(nn.initializers.zeros, ('embed',)),
      )
    elif self.kind == 'rmsnorm':
      norm = nn.RMSNorm(
        epsilon=1e-6, dtype=self.dtype, param_dtype=self.param_dtype, scale_init=scale_init
      )
    else:
      raise ValueError(f"model.norm must be 'layernorm' or 'rmsnorm', got {self.kind!r}")
    return norm(x)


def rope(x, positions, base: float = 10_000.0):
  """Rotary position embedding of [batch, length, heads, head_dim] at positions [batch, length]."""
  head_dim = x.shape[-1]
  fraction = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
  inverse_frequency = base**-fraction  # [head_dim / 2]
  angles = positions[:, :, None, None].astype(jnp.float32) * inverse_frequency  # [b, l, 1, half]
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  first, second = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
  return rotated.astype(x.dtype)


def attention(query, key, value, mask=None, causal: bool = True):
  """softmax(q k^T / sqrt(d) + mask) v over [batch, length, heads, kv], with the
  causal mask (decoder) or without (encoder), and `mask` [batch, 1, q, k] on top;
  scores and softmax in float32. Written out rather than jax.nn.dot_product_attention:
  on CPU, XLA then keeps the heads-major layout batched matmuls want (about 2 % of
  the shakespeare_char step)."""
  length, head_dim = query.shape[1], query.shape[-1]
  q = jnp.einsum('bqhk->bhqk', query) * jnp.asarray(head_dim**-0.5, query.dtype)
  scores = jnp.einsum('bhqk,bshk->bhqs', q, key, preferred_element_type=jnp.float32)
  allowed = jnp.tril(jnp.ones((length, length), bool))[None, None] if causal else None
  if mask is not None:
    allowed = mask if allowed is None else allowed & mask
  if allowed is not None:
    scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(value.dtype)
  return jnp.einsum('bhqs,bshk->bqhk', probs, value)


class SelfAttention(nn.Module):
  """Multi-head self-attention, causal (decoder) or bidirectional (encoder): one
  fused QKV projection, then `attention`. With `segment_ids` [batch, length], a
  token attends only within its segment (0 = padding)."""

  num_heads: int
  causal: bool = True
  use_rope: bool = False
  out_init_scale: float = 1.0  # Residual projections are scaled down by depth.
  cache_len: int = 0  # decode: tokens the key/value cache holds (the model's context)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, positions, segment_ids=None, decode: bool = False):
    """x [batch, length, embed]. With `decode`, x is one token per row at absolute
    position `positions` [batch, 1] (the same for every row): its key and value go
    into a ring-buffer cache of the last `cache_len` tokens (the 'cache'
    collection, created zeroed on first use), and the token attends to the cache.
    With RoPE, attention depends only on relative positions, so the ring buffer
    keeps working past cache_len (a sliding window)."""
    embed_dim = x.shape[-1]
    if embed_dim % self.num_heads:
      raise ValueError(
        f'model.embed_dim={embed_dim} is not divisible by model.num_heads={self.num_heads}'
      )
    head_dim = embed_dim // self.num_heads
    einsum = functools.partial(Einsum, dtype=self.dtype, param_dtype=self.param_dtype)
    # Projected in the matmul's natural [batch, length, qkv, heads, kv] layout.
    qkv = einsum(
      (embed_dim, 3, self.num_heads, head_dim),
      ('embed', 'qkv', 'heads', 'kv'),
      'bld,dthk->blthk',
      name='qkv',
    )(x)
    query, key, value = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [batch, length, heads, kv]
    if self.use_rope:
      query, key = rope(query, positions), rope(key, positions)
    if decode:
      if not self.causal:
        raise ValueError('a bidirectional encoder cannot decode token by token')
      return self._out(self._decode(query, key, value, positions[0, 0]), head_dim, embed_dim)
    mask = None
    if segment_ids is not None:  # Packed rows: no attention across documents.
      mask = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
    out = attention(query, key, value, mask, self.causal)
    return self._out(out, head_dim, embed_dim)

  def _out(self, out, head_dim, embed_dim):
    out = nn.with_logical_constraint(out, ('batch', 'length', 'heads', 'kv'))
    return Einsum(
      (self.num_heads, head_dim, embed_dim),
      ('heads', 'kv', 'embed'),
      'blhk,hkd->bld',
      init_scale=self.out_init_scale,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name='out',
    )(out)

  def _decode(self, query, key, value, position):
    batch, _, heads, head_dim = key.shape
    shape = (batch, self.cache_len, heads, head_dim)
    cached_key = self.variable('cache', 'key', jnp.zeros, shape, key.dtype)
    cached_value = self.variable('cache', 'value', jnp.zeros, shape, value.dtype)
    slot = position % self.cache_len
    cached_key.value = jax.lax.dynamic_update_index_in_dim(cached_key.value, key[:, 0], slot, 1)
    cached_value.value = jax.lax.dynamic_update_index_in_dim(
      cached_value.value, value[:, 0], slot, 1
    )
    filled = (jnp.arange(self.cache_len) <= position)[None, None, None, :]  # [1, 1, 1, cache]
    return jax.nn.dot_product_attention(query, cached_key.value, cached_value.value, mask=filled)


class Mlp(nn.Module):
  """GELU MLP, or SwiGLU with fused gate and up projections."""

  hidden_dim: int
  kind: str = 'gelu'
  out_init_scale: float = 1.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):  # [batch, length, embed]
    embed_dim = x.shape[-1]
    einsum = functools.partial(Einsum, dtype=self.dtype, param_dtype=self.param_dtype)
    if self.kind == 'gelu':
      hidden = einsum((embed_dim, self.hidden_dim), ('embed', 'mlp'), 'bld,df->blf', name='up')(x)
      hidden = gelu(hidden)
    elif self.kind == 'swiglu':
      gate_up = einsum(
        (embed_dim, 2, self.hidden_dim), ('embed', 'qkv', 'mlp'), 'bld,dtf->bltf', name='gate_up'
      )(x)
      hidden = nn.silu(gate_up[..., 0, :]) * gate_up[..., 1, :]
    else:
      raise ValueError(f"model.mlp must be 'gelu' or 'swiglu', got {self.kind!r}")
    hidden = nn.with_logical_constraint(hidden, ('batch', 'length', 'mlp'))
    return einsum(
      (self.hidden_dim, embed_dim),
      ('mlp', 'embed'),
      'blf,fd->bld',
      init_scale=self.out_init_scale,
      name='down',
    )(hidden)
