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
MLPS = ('gelu', 'gelu_exact', 'swiglu')  # model.mlp
NORM_EPS = {'layernorm': 1e-5, 'rmsnorm': 1e-6}  # model.norm_eps = 0
ROPE_SCALINGS = ('', 'llama3')  # model.rope_scaling.kind

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


def platform() -> str:
  """The platform of the program being traced: that of the mesh in context (a
  TPU slice's when compiling ahead of time on another machine), else JAX's
  default backend. Layers pick their kernels by it."""
  device = jax.sharding.get_abstract_mesh().abstract_device
  return device.platform if device is not None else jax.default_backend()


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
  if platform() == 'cpu':
    return _gelu_cpu(x)
  return nn.gelu(x, approximate=True)


def activation(kind: str):
  """The MLP's activation: tanh-approximated GELU ('gelu', GPT-2's), the exact
  erf GELU ('gelu_exact', BERT's), or SiLU (the gate of 'swiglu')."""
  if kind == 'gelu':
    return gelu
  if kind == 'gelu_exact':
    return functools.partial(nn.gelu, approximate=False)
  if kind == 'swiglu':
    return nn.silu
  raise ValueError(f'model.mlp must be one of {", ".join(MLPS)}; got {kind!r}')


def partitioned(init, names):
  return nn.with_logical_partitioning(init, names)


class Einsum(nn.Module):
  """A projection `einsum(equation, x, kernel)` with a kernel of any rank, and
  with `use_bias` a bias over the kernel's last `bias_dims` axes (the output's).

  The kernel is created at its true shape with its logical axis names (flax's
  DenseGeneral flattens multi-axis kernels, which breaks their constraints
  under a mesh).
  """

  shape: tuple
  names: tuple
  equation: str
  init_scale: float = 1.0
  use_bias: bool = False
  bias_dims: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.normal(stddev=0.02 * self.init_scale)
    kernel = self.param('kernel', partitioned(init, self.names), self.shape, self.param_dtype)
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    y = jnp.einsum(self.equation, x, kernel)
    if self.use_bias:
      shape, names = self.shape[-self.bias_dims :], self.names[-self.bias_dims :]
      bias = self.param('bias', partitioned(nn.initializers.zeros, names), shape, self.param_dtype)
      y = y + jnp.asarray(bias, self.dtype)
    return y


class Norm(nn.Module):
  """LayerNorm or RMSNorm over the last axis, computed in float32 (`eps` 0: the
  kind's default)."""

  kind: str = 'layernorm'
  eps: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    if self.kind not in NORMS:
      raise ValueError(f"model.norm must be 'layernorm' or 'rmsnorm', got {self.kind!r}")
    scale_init = partitioned(nn.initializers.ones, ('embed',))
    eps = self.eps or NORM_EPS[self.kind]
    if self.kind == 'layernorm':
      norm = nn.LayerNorm(
        epsilon=eps,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        scale_init=scale_init,
        bias_init=partitioned(nn.initializers.zeros, ('embed',)),
      )
    else:
      norm = nn.RMSNorm(
        epsilon=eps, dtype=self.dtype, param_dtype=self.param_dtype, scale_init=scale_init
      )
    return norm(x)


def rope_frequencies(head_dim: int, theta: float = 10_000.0, scaling: tuple = ()) -> jax.Array:
  """RoPE's inverse frequencies [head_dim / 2] (float32). `scaling` ('llama3',
  factor, low_freq_factor, high_freq_factor, original_max_len) stretches the
  low frequencies for a longer context as Llama 3.1 does: wavelengths beyond
  original_max_len / low_freq_factor are divided by `factor`, those below
  original_max_len / high_freq_factor kept, and those between interpolated."""
  fraction = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
  inverse = 1.0 / (jnp.float32(theta) ** fraction)
  if not scaling:
    return inverse
  kind, factor, low, high, original = scaling
  if kind != 'llama3':
    raise ValueError(f"model.rope_scaling.kind must be '' or 'llama3'; got {kind!r}")
  wavelength = 2 * jnp.pi / inverse
  smooth = (original / wavelength - low) / (high - low)
  scaled = jnp.where(wavelength > original / low, inverse / factor, inverse)
  between = (wavelength <= original / low) & (wavelength >= original / high)
  return jnp.where(between, (1 - smooth) * inverse / factor + smooth * inverse, scaled)


def rope(x, positions, inverse_frequency=None):
  """Rotary position embedding of [batch, length, heads, head_dim] at positions
  [batch, length]: the two halves of each head rotated (the layout Hugging Face
  checkpoints use), at `rope_frequencies` (theta 10,000 when not given)."""
  head_dim = x.shape[-1]
  if inverse_frequency is None:
    inverse_frequency = rope_frequencies(head_dim)
  angles = positions[:, :, None, None].astype(jnp.float32) * inverse_frequency  # [b, l, 1, half]
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  first, second = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
  return rotated.astype(x.dtype)


ATTENTION_KERNELS = ('auto', 'xla', 'cudnn', 'splash')  # model.attention
SPLASH_BLOCKS = (512, 256, 128)  # splash tiles: the largest that divides the length


def attention_kernel(requested: str, platform_name: str, dtype, length: int, head_dim: int) -> str:
  """The kernel `attention` runs: `requested` unless it is 'auto', which picks
  the Pallas splash kernel on TPU where the length is a multiple of 128, cuDNN
  flash attention on GPU in 16-bit floats with a head size it supports (a
  multiple of 8, at most 128), and else XLA's (today's written-out softmax)."""
  if requested not in ATTENTION_KERNELS:
    raise ValueError(f'model.attention={requested!r}: choose one of {ATTENTION_KERNELS}')
  if requested != 'auto':
    return requested
  if platform_name == 'tpu' and length % SPLASH_BLOCKS[-1] == 0:
    return 'splash'
  half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  if platform_name == 'gpu' and half and head_dim % 8 == 0 and head_dim <= 128:
    return 'cudnn'
  return 'xla'


def attention(
  query,
  key,
  value,
  segment_ids=None,
  causal: bool = True,
  kernel: str = 'auto',
  kv_segment_ids=None,
):
  """softmax(q k^T / sqrt(d)) v over [batch, length, heads, kv], causal
  (decoder) or not (encoder); with `segment_ids` [batch, length], a token
  attends only within its segment (packed rows; 0 = padding). Fewer key/value
  heads than query heads is grouped-query attention: query head h reads
  key/value head h // (heads / kv_heads). One function, one implementation per
  platform (`attention_kernel`): 'xla' (scores and softmax in float32), 'cudnn'
  (jax.nn.dot_product_attention's cuDNN flash kernel) or 'splash' (the Pallas
  TPU splash kernel; off a TPU it runs in Pallas' interpret mode, for tests).
  Cross-attention passes keys of another length with their own
  `kv_segment_ids`: query i then reads key j where their segment ids match."""
  platform_name = platform()
  length = min(query.shape[1], key.shape[1])  # the kernel must tile both
  chosen = attention_kernel(kernel, platform_name, query.dtype, length, query.shape[-1])
  if chosen == 'splash' and key.shape[1] % SPLASH_BLOCKS[-1]:
    chosen = 'xla' if kernel == 'auto' else chosen
  if kv_segment_ids is None:
    kv_segment_ids = segment_ids
  if chosen == 'splash':
    return _splash_attention(
      query, key, value, segment_ids, causal, platform_name != 'tpu', kv_segment_ids
    )
  mask = None
  if segment_ids is not None:
    mask = segment_ids[:, None, :, None] == kv_segment_ids[:, None, None, :]
  if chosen == 'cudnn':
    if platform_name != 'gpu':
      raise ValueError(f"model.attention='cudnn' needs a GPU; this program is for {platform_name}")
    return jax.nn.dot_product_attention(
      query, key, value, mask=mask, is_causal=causal, implementation='cudnn'
    )
  return xla_attention(query, key, value, mask, causal)


def xla_attention(query, key, value, mask=None, causal: bool = True):
  """The reference formulation, with `mask` [batch, 1, q, k] on top of the
  causal one. Written out rather than jax.nn.dot_product_attention: on CPU, XLA
  then keeps the heads-major layout batched matmuls want (about 2 % of the
  shakespeare_char step)."""
  batch, length, heads, head_dim = query.shape
  kv_heads = key.shape[2]
  scale = jnp.asarray(head_dim**-0.5, query.dtype)
  allowed = jnp.tril(jnp.ones((length, key.shape[1]), bool))[None, None] if causal else None
  if mask is not None:
    allowed = mask if allowed is None else allowed & mask
  if kv_heads != heads:  # grouped: [batch, kv_heads, groups, q, k]
    q = query.reshape(batch, length, kv_heads, heads // kv_heads, head_dim) * scale
    scores = jnp.einsum('bqkgd,bskd->bkgqs', q, key, preferred_element_type=jnp.float32)
    if allowed is not None:
      scores = jnp.where(allowed[:, :, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(value.dtype)
    out = jnp.einsum('bkgqs,bskd->bqkgd', probs, value)
    return out.reshape(batch, length, heads, head_dim)
  q = jnp.einsum('bqhk->bhqk', query) * scale
  scores = jnp.einsum('bhqk,bshk->bhqs', q, key, preferred_element_type=jnp.float32)
  if allowed is not None:
    scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(value.dtype)
  return jnp.einsum('bhqs,bshk->bqhk', probs, value)


def _splash_attention(
  query, key, value, segment_ids, causal: bool, interpret: bool, kv_segment_ids=None
):
  """The Pallas splash kernel, per example over [heads, length, kv]. A Pallas
  kernel cannot be partitioned by the compiler, so under a mesh it runs in
  shard_map: each device takes its rows (the 'batch' axes) and heads (the
  'heads' axes) of q, k and v, which attention never mixes."""
  from jax.experimental.pallas.ops.tpu import splash_attention as splash  # noqa: PLC0415 (TPU-only)

  length, kv_length, head_dim = query.shape[1], key.shape[1], query.shape[-1]
  for what, n in (('length', length), ('key length', kv_length)):
    if n % SPLASH_BLOCKS[-1]:
      raise ValueError(
        f'the splash attention kernel needs a {what} that is a multiple of '
        f'{SPLASH_BLOCKS[-1]}, got {n}: set data.seq_len, or model.attention=xla'
      )
  block = next(b for b in SPLASH_BLOCKS if length % b == 0 and kv_length % b == 0)
  blocks = splash.BlockSizes(
    block_q=block,
    block_kv=block,
    block_kv_compute=block,
    block_q_dkv=block,
    block_kv_dkv=block,
    block_kv_dkv_compute=block,
    block_q_dq=block,
    block_kv_dq=block,
  )
  mask_kind = splash.CausalMask if causal else splash.FullMask

  def local(q, k, v, segments, kv_segments):  # one device's share: [rows, length, heads, kv]
    heads = q.shape[2]
    mask = splash.MultiHeadMask([mask_kind((length, kv_length)) for _ in range(heads)])
    kernel = splash.make_splash_mha(
      mask, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret
    )
    q = q * jnp.asarray(head_dim**-0.5, q.dtype)
    q, k, v = (jnp.einsum('blhk->bhlk', x) for x in (q, k, v))
    if segments is None:
      out = jax.vmap(kernel)(q, k, v)
    else:
      ids = splash.SegmentIds(q=segments, kv=kv_segments)
      out = jax.vmap(lambda q, k, v, ids: kernel(q, k, v, segment_ids=ids))(q, k, v, ids)
    return jnp.einsum('bhlk->blhk', out)

  if kv_segment_ids is None:
    kv_segment_ids = segment_ids
  if jax.sharding.get_abstract_mesh().empty:  # one device's program (pmap, or none)
    return local(query, key, value, segment_ids, kv_segment_ids)
  spec = nn.logical_to_mesh_axes(('batch', 'length', 'heads', 'kv'))
  rows = jax.sharding.PartitionSpec(spec[0], None)
  segments_spec = None if segment_ids is None else rows
  return jax.shard_map(
    local,
    in_specs=(spec, spec, spec, segments_spec, segments_spec),
    out_specs=spec,
    check_vma=False,
  )(query, key, value, segment_ids, kv_segment_ids)


class SelfAttention(nn.Module):
  """Multi-head self-attention, causal (decoder) or bidirectional (encoder):
  one fused QKV projection (with `num_kv_heads` < `num_heads`, grouped-query
  attention: a query projection and a fused key/value one of fewer heads),
  then `attention`. With `segment_ids` [batch, length], a token attends only
  within its segment (0 = padding)."""

  num_heads: int
  causal: bool = True
  use_rope: bool = False
  out_init_scale: float = 1.0  # Residual projections are scaled down by depth.
  cache_len: int = 0  # decode: tokens the key/value cache holds (the model's context)
  num_kv_heads: int = 0  # 0 = num_heads
  head_dim: int = 0  # 0 = embed_dim / num_heads
  use_bias: bool = False  # biases on the query/key/value and output projections
  qkv_bias: bool = False  # biases on the query/key/value projections only
  rope_theta: float = 10_000.0
  rope_scaling: tuple = ()
  kernel: str = 'auto'  # model.attention: see attention_kernel
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, positions, segment_ids=None, decode: bool = False):
    """x [batch, length, embed]. With `decode`, x is one token per row at absolute
    position `positions` [batch, 1] (the same for every row): its key and value go
    into a ring-buffer cache of the last `cache_len` tokens (the 'cache'
    collection, created zeroed on first use; kv_heads wide, so grouped-query
    attention shrinks it by heads / kv_heads), and the token attends to the
    cache. With RoPE, attention depends only on relative positions, so the ring
    buffer keeps working past cache_len (a sliding window)."""
    embed_dim = x.shape[-1]
    if not self.head_dim and embed_dim % self.num_heads:
      raise ValueError(
        f'model.embed_dim={embed_dim} is not divisible by model.num_heads={self.num_heads}'
      )
    heads, kv_heads = self.num_heads, self.num_kv_heads or self.num_heads
    if heads % kv_heads:
      raise ValueError(
        f'model.num_heads={heads} is not a multiple of model.num_kv_heads={kv_heads}'
      )
    head_dim = self.head_dim or embed_dim // heads
    einsum = functools.partial(
      Einsum,
      use_bias=self.use_bias or self.qkv_bias,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
    )
    if kv_heads == heads:  # fused, in the matmul's natural [batch, length, qkv, heads, kv]
      qkv = einsum(
        (embed_dim, 3, heads, head_dim),
        ('embed', 'qkv', 'heads', 'kv'),
        'bld,dthk->blthk',
        bias_dims=3,
        name='qkv',
      )(x)
      query, key, value = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [batch, length, heads, kv]
    else:
      query = einsum(
        (embed_dim, heads, head_dim),
        ('embed', 'heads', 'kv'),
        'bld,dhk->blhk',
        bias_dims=2,
        name='query',
      )(x)
      key_value = einsum(
        (embed_dim, 2, kv_heads, head_dim),
        ('embed', 'qkv', 'heads', 'kv'),
        'bld,dthk->blthk',
        bias_dims=3,
        name='key_value',
      )(x)
      key, value = key_value[:, :, 0], key_value[:, :, 1]  # [batch, length, kv_heads, kv]
    if self.use_rope:
      frequencies = rope_frequencies(head_dim, self.rope_theta, self.rope_scaling)
      query, key = rope(query, positions, frequencies), rope(key, positions, frequencies)
    if decode:
      if not self.causal:
        raise ValueError('a bidirectional encoder cannot decode token by token')
      return self._out(self._decode(query, key, value, positions[0, 0]), head_dim, embed_dim)
    out = attention(query, key, value, segment_ids, self.causal, self.kernel)
    return self._out(out, head_dim, embed_dim)

  def _out(self, out, head_dim, embed_dim):
    return output_projection(self, out, head_dim, embed_dim)

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


def output_projection(module, out, head_dim: int, embed_dim: int):
  """The heads [batch, length, heads, kv] projected back to the residual stream,
  by `module`'s 'out' kernel (self- and cross-attention alike)."""
  out = nn.with_logical_constraint(out, ('batch', 'length', 'heads', 'kv'))
  return Einsum(
    (module.num_heads, head_dim, embed_dim),
    ('heads', 'kv', 'embed'),
    'blhk,hkd->bld',
    init_scale=module.out_init_scale,
    use_bias=module.use_bias,
    dtype=module.dtype,
    param_dtype=module.param_dtype,
    name='out',
  )(out)


class CrossAttention(nn.Module):
  """A decoder's attention over the encoder's output (T5, BART): queries from
  x, keys and values from `encoded` [batch, source length, embed]; a query
  reads the keys of its own segment (`segment_ids` against
  `encoder_segment_ids`: the same pair of a packed row; 0 = padding). No
  positions: the encoder's output carries them. With `decode`, the keys and
  values are computed once, when `encoded` is given (the first step), into the
  'cache' collection, and read from there at every later step (`encoded` None);
  the one query then reads every non-padding key."""

  num_heads: int
  out_init_scale: float = 1.0
  num_kv_heads: int = 0
  head_dim: int = 0
  use_bias: bool = False
  qkv_bias: bool = False
  kernel: str = 'auto'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, encoded, segment_ids=None, encoder_segment_ids=None, decode=False):
    embed_dim = x.shape[-1]
    heads, kv_heads = self.num_heads, self.num_kv_heads or self.num_heads
    head_dim = self.head_dim or embed_dim // heads
    einsum = functools.partial(
      Einsum,
      use_bias=self.use_bias or self.qkv_bias,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
    )
    query = einsum(
      (embed_dim, heads, head_dim),
      ('embed', 'heads', 'kv'),
      'bld,dhk->blhk',
      bias_dims=2,
      name='query',
    )(x)
    project = einsum(
      (embed_dim, 2, kv_heads, head_dim),
      ('embed', 'qkv', 'heads', 'kv'),
      'bld,dthk->blthk',
      bias_dims=3,
      name='key_value',
    )
    if not decode:
      key_value = project(encoded)
      out = attention(
        query,
        key_value[:, :, 0],
        key_value[:, :, 1],
        segment_ids,
        causal=False,
        kernel=self.kernel,
        kv_segment_ids=encoder_segment_ids,
      )
      return output_projection(self, out, head_dim, embed_dim)
    if encoded is not None:  # the first step: the cache of the whole source
      key_value = project(encoded)
      segments = (
        jnp.ones(encoded.shape[:2], jnp.int32)
        if encoder_segment_ids is None
        else encoder_segment_ids
      )
      for name, value in (('cross_key_value', key_value), ('cross_segments', segments)):
        self.variable('cache', name, lambda v=value: v).value = value
    elif not self.has_variable('cache', 'cross_key_value'):
      raise ValueError('cross-attention decodes from a cache: give `encoded` at the first step')
    key_value = self.get_variable('cache', 'cross_key_value')
    keep = self.get_variable('cache', 'cross_segments') > 0  # [batch, source]
    out = xla_attention(
      query, key_value[:, :, 0], key_value[:, :, 1], keep[:, None, None, :], causal=False
    )
    return output_projection(self, out, head_dim, embed_dim)


class Mlp(nn.Module):
  """GELU MLP (tanh-approximated or exact), or SwiGLU with fused gate and up
  projections; `use_bias` adds biases to every projection."""

  hidden_dim: int
  kind: str = 'gelu'
  out_init_scale: float = 1.0
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):  # [batch, length, embed]
    embed_dim = x.shape[-1]
    einsum = functools.partial(
      Einsum, use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype
    )
    act = activation(self.kind)
    if self.kind == 'swiglu':
      gate_up = einsum(
        (embed_dim, 2, self.hidden_dim),
        ('embed', 'qkv', 'mlp'),
        'bld,dtf->bltf',
        bias_dims=2,
        name='gate_up',
      )(x)
      hidden = act(gate_up[..., 0, :]) * gate_up[..., 1, :]
    else:
      hidden = act(
        einsum((embed_dim, self.hidden_dim), ('embed', 'mlp'), 'bld,df->blf', name='up')(x)
      )
    hidden = nn.with_logical_constraint(hidden, ('batch', 'length', 'mlp'))
    return einsum(
      (self.hidden_dim, embed_dim),
      ('mlp', 'embed'),
      'blf,fd->bld',
      init_scale=self.out_init_scale,
      name='down',
    )(hidden)
