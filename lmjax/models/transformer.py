"""Transformer language models (pre-norm): the causal decoder (next-token LM)
and, with family 'encoder', the bidirectional encoder (masked LM): one module,
the same blocks, only the attention mask differs. Both read their settings
from one `model_config.ModelConfig`."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lmjax.models import layers
from lmjax.models import model_config

# Activation checkpointing of whole blocks: what the backward pass may keep.
POSITIONS = ('learned', 'rope')  # model.positions
REMAT_POLICIES = {
  'none': None,
  'full': None,
  'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


BLOCKS = ('pre_norm', 'post_norm')  # model.block


class Block(nn.Module):
  """Residual block. Pre-norm (GPT-2, Llama): x + attention(norm(x)), then
  x + mlp(norm(x)). Post-norm (BERT): norm(x + attention(x)), then
  norm(x + mlp(x)). With `cross` (an encoder-decoder's decoder), a
  cross-attention sublayer over `encoded` sits between the two, the same way.
  `causal` None is the family's (an encoder-decoder's encoder passes False)."""

  config: model_config.ModelConfig
  causal: bool | None = None
  cross: bool = False

  @nn.compact
  def __call__(
    self,
    x,
    positions,
    segment_ids,
    deterministic: bool,
    decode: bool = False,
    encoded=None,
    encoder_segment_ids=None,
  ):
    c = self.config  # x: [batch, length, embed]
    if c.block not in BLOCKS:
      raise ValueError(f"model.block must be 'pre_norm' or 'post_norm', got {c.block!r}")
    kinds = dict(dtype=c.dtype, param_dtype=c.param_dtype)
    # Residual projections are scaled down by depth (GPT-2).
    out_init_scale = 1.0 / math.sqrt(2 * c.num_layers)
    attention = layers.SelfAttention(
      c.num_heads,
      causal=c.causal if self.causal is None else self.causal,
      use_rope=c.positions == 'rope',
      out_init_scale=out_init_scale,
      cache_len=c.max_len,
      num_kv_heads=c.num_kv_heads,
      head_dim=c.head_dim,
      use_bias=c.bias,
      qkv_bias=c.qkv_bias,
      rope_theta=c.rope_theta,
      rope_scaling=c.rope_scaling,
      kernel=c.attention,
      name='attention',
      **kinds,
    )
    mlp = layers.Mlp(
      c.mlp_hidden_dim,
      kind=c.mlp,
      out_init_scale=out_init_scale,
      use_bias=c.bias,
      name='mlp',
      **kinds,
    )
    norm = lambda name: layers.Norm(c.norm, c.norm_eps, name=name, **kinds)
    drop = lambda h: nn.Dropout(c.dropout)(h, deterministic=deterministic)
    cross = lambda h: layers.CrossAttention(
      c.num_heads,
      out_init_scale=out_init_scale,
      num_kv_heads=c.num_kv_heads,
      head_dim=c.head_dim,
      use_bias=c.bias,
      qkv_bias=c.qkv_bias,
      kernel=c.attention,
      name='cross_attention',
      **kinds,
    )(h, encoded, segment_ids, encoder_segment_ids, decode)
    if c.block == 'post_norm':
      x = norm('attention_norm')(x + drop(attention(x, positions, segment_ids, decode)))
      if self.cross:
        x = norm('cross_norm')(x + drop(cross(x)))
      x = norm('mlp_norm')(x + drop(mlp(x)))
    else:
      x = x + drop(attention(norm('attention_norm')(x), positions, segment_ids, decode))
      if self.cross:
        x = x + drop(cross(norm('cross_norm')(x)))
      x = x + drop(mlp(norm('mlp_norm')(x)))
    return nn.with_logical_constraint(x, ('batch', 'length', 'embed'))


SCANNED = 'blocks'  # params[SCANNED]: every block's parameters, stacked on axis 0


def _block_class(c):
  """Block, or Block under activation checkpointing with `c.remat`'s policy
  (deterministic and decode are static; under scan, prevent_cse is unneeded
  and slows it)."""
  if c.remat == 'none':
    return Block
  return nn.remat(
    Block, policy=REMAT_POLICIES[c.remat], prevent_cse=not c.scan_layers, static_argnums=(4, 5)
  )  # (self, x, positions, segment_ids, deterministic, decode, ...)


# Up to this depth the scan is unrolled: the same stacked parameters, no loop in
# the program. XLA:CPU compiles a 2-layer loop 0.6 s slower than 2 blocks in line
# (2.15 s against 1.46 s, the tests' tiny train step), about even at 4.
UNROLLED_SCAN_LAYERS = 2


def rolled_scan(c) -> bool:
  """Whether `c`'s blocks run as a loop in the program (scanned and deeper than
  UNROLLED_SCAN_LAYERS): XLA's cost analysis then counts one block."""
  return c.scan_layers and c.num_layers > UNROLLED_SCAN_LAYERS


def run_blocks(
  c,
  x,
  positions,
  segment_ids,
  deterministic: bool,
  decode: bool,
  encoded=None,
  encoder_segment_ids=None,
  causal: bool | None = None,
  cross: bool = False,
):
  """The model's `c.num_layers` blocks over x, created in the calling module:
  scanned (one `nn.scan` over a stacked 'layers' axis of parameters and decode
  cache, the remat policy inside; XLA compiles one block, or up to
  UNROLLED_SCAN_LAYERS the blocks in line) or a Python loop (`block_0`, ...)."""
  block = _block_class(c)
  if not c.scan_layers:
    for i in range(c.num_layers):
      x = block(c, causal, cross, name=f'block_{i}')(
        x, positions, segment_ids, deterministic, decode, encoded, encoder_segment_ids
      )
    return x

  def body(module, carry, *broadcast):
    return module(carry, *broadcast[:2], deterministic, decode, *broadcast[2:]), None

  scan = nn.scan(
    body,
    variable_axes={'params': 0, 'cache': 0},
    split_rngs={'params': True, 'dropout': True},
    in_axes=(nn.broadcast,) * 4,
    length=c.num_layers,
    unroll=c.num_layers if c.num_layers <= UNROLLED_SCAN_LAYERS else 1,
    metadata_params={nn.PARTITION_NAME: 'layers'},
  )
  module = block(c, causal, cross, name=SCANNED)
  return scan(module, x, positions, segment_ids, encoded, encoder_segment_ids)[0]


def unstack_layers(flat: dict, num_layers: int, take=lambda value, i: value[i]) -> dict:
  """A flat {path: array} tree in the scanned layout as the loop's: each
  (SCANNED, *rest) leaf becomes (f'block_{i}', *rest) holding `take(leaf, i)`
  for every layer i (a view of a numpy array, no copy). Other leaves are kept."""
  out = {}
  for path, value in flat.items():
    if path[0] != SCANNED:
      out[path] = value
      continue
    for i in range(num_layers):
      out[(f'block_{i}', *path[1:])] = take(value, i)
  return out


def stack_layers(flat: dict, num_layers: int) -> dict:
  """The inverse of `unstack_layers`: the loop's per-block leaves stacked (numpy)
  on a leading axis under SCANNED."""
  out, layers = {}, {}
  for path, value in flat.items():
    head = path[0]
    if head.startswith('block_') and head[6:].isdigit():
      layers.setdefault(path[1:], {})[int(head[6:])] = value
    else:
      out[path] = value
  for rest, by_layer in layers.items():
    if sorted(by_layer) != list(range(num_layers)):
      raise ValueError(
        f'blocks {sorted(by_layer)} of {"/".join(rest)}: expected 0..{num_layers - 1}'
      )
    out[(SCANNED, *rest)] = np.stack([by_layer[i] for i in range(num_layers)])
  return out


def _embedding(c):
  return nn.Embed(
    c.vocab_size,
    c.embed_dim,
    dtype=c.dtype,
    param_dtype=c.param_dtype,
    name='embed',
    embedding_init=layers.partitioned(layers.default_init, ('vocab', 'embed')),
  )


def _norm(c, name: str):
  return layers.Norm(c.norm, c.norm_eps, dtype=c.dtype, param_dtype=c.param_dtype, name=name)


def _check(c) -> None:
  if c.positions not in POSITIONS:
    raise ValueError(f"model.positions must be 'learned' or 'rope', got {c.positions!r}")
  if c.remat not in REMAT_POLICIES:
    raise ValueError(f'model.remat must be one of {", ".join(REMAT_POLICIES)}; got {c.remat!r}')


def _position_table(c):
  """The learned position embeddings (None with RoPE)."""
  if c.positions != 'learned':
    return None
  return nn.Embed(
    c.max_len,
    c.embed_dim,
    dtype=c.dtype,
    param_dtype=c.param_dtype,
    name='position_embed',
    embedding_init=layers.partitioned(layers.default_init, ('length', 'embed')),
  )


def _embedded(module, c, embed, table, tokens, positions, deterministic: bool, prefix: str = ''):
  """(token embeddings [+ learned positions from `table`] [+ BERT's type 0]
  [normed], positions), created in `module`; `prefix` names a post-norm
  embedding norm apart (an encoder-decoder embeds twice)."""
  batch, length = tokens.shape
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
  x = embed(tokens)  # [batch, length, embed]
  if table is not None:
    x = x + table(positions)
  if c.type_vocab_size:  # BERT: every token is of type 0 (one segment per row)
    types = module.param(
      'type_embed',
      layers.partitioned(layers.default_init, ('types', 'embed')),
      (c.type_vocab_size, c.embed_dim),
      c.param_dtype,
    )
    x = x + jnp.asarray(types[0], c.dtype)
  if c.block == 'post_norm':  # BERT normalises the embeddings, and not the output
    x = _norm(c, f'{prefix}embed_norm')(x)
  x = nn.Dropout(c.dropout)(x, deterministic=deterministic)
  return nn.with_logical_constraint(x, ('batch', 'length', 'embed')), positions


def _logits(module, c, embed, x):
  """The output head over the final hidden states [batch, length, embed]."""
  if c.head_transform:  # BERT's masked-LM head: dense, activation, norm
    x = layers.Einsum(
      (c.embed_dim, c.embed_dim),
      ('embed', 'mlp'),
      'bld,de->ble',
      use_bias=True,
      dtype=c.dtype,
      param_dtype=c.param_dtype,
      name='head_transform',
    )(x)
    x = _norm(c, 'head_norm')(layers.activation(c.mlp)(x))
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
  if c.output_bias:
    bias = module.param(
      'output_bias',
      layers.partitioned(nn.initializers.zeros, ('vocab',)),
      (c.vocab_size,),
      c.param_dtype,
    )
    logits = logits + jnp.asarray(bias, logits.dtype)
  return nn.with_logical_constraint(logits, ('batch', 'length', 'vocab'))


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
    _check(c)
    embed, table = _embedding(c), _position_table(c)
    x, positions = _embedded(self, c, embed, table, tokens, positions, deterministic)
    x = run_blocks(c, x, positions, segment_ids, deterministic, decode)
    if c.block != 'post_norm':
      x = _norm(c, 'final_norm')(x)
    if not head:
      return x
    return _logits(self, c, embed, x)


class EncoderDecoder(nn.Module):
  """model.family='encoder_decoder' (T5, BART): a bidirectional encoder over the
  source and a causal decoder over the target that cross-attends to it, built
  from the same blocks (lmjax.models.layers) as TransformerLM, with one token
  embedding (and position table) shared by both and by the output.

  `tokens` [batch, target length] are the decoder's inputs, `encoder_tokens`
  [batch, source length] the source (with their own positions and segment ids:
  a packed pair's decoder tokens read its encoder tokens, through equal segment
  ids); returns the decoder's logits. Without `encoder_tokens` (model.init on
  one sample), the tokens are the source too. `decode=True` runs one decoder
  token per row against the self-attention key/value cache; the first step
  gives `encoder_tokens`, encoded once into every layer's cross-attention cache,
  and later steps read that cache (`encoder_tokens` None)."""

  config: model_config.ModelConfig
  encoder_decoder = True  # class attribute: callers pass the encoder's batch too

  @nn.compact
  def __call__(
    self,
    tokens,
    positions=None,
    segment_ids=None,
    deterministic: bool = True,
    decode: bool = False,
    head: bool = True,
    encoder_tokens=None,
    encoder_positions=None,
    encoder_segment_ids=None,
  ):
    c = self.config
    _check(c)
    embed, table = _embedding(c), _position_table(c)
    if encoder_tokens is None and not decode:
      encoder_tokens, encoder_positions, encoder_segment_ids = tokens, positions, segment_ids
    encoded = None
    if encoder_tokens is not None:
      source, source_positions = _embedded(
        self, c, embed, table, encoder_tokens, encoder_positions, deterministic, 'encoder_'
      )
      encoded = _Stack(c, causal=False, name='encoder')(
        source, source_positions, encoder_segment_ids, deterministic
      )
    x, positions = _embedded(self, c, embed, table, tokens, positions, deterministic, 'decoder_')
    x = _Stack(c, causal=True, cross=True, name='decoder')(
      x, positions, segment_ids, deterministic, decode, encoded, encoder_segment_ids
    )
    if not head:
      return x
    return _logits(self, c, embed, x)


class _Stack(nn.Module):
  """An encoder-decoder's encoder or decoder: the blocks, then (pre-norm) a final norm."""

  config: model_config.ModelConfig
  causal: bool = True
  cross: bool = False

  @nn.compact
  def __call__(
    self,
    x,
    positions,
    segment_ids,
    deterministic: bool,
    decode: bool = False,
    encoded=None,
    encoder_segment_ids=None,
  ):
    c = self.config
    x = run_blocks(
      c,
      x,
      positions,
      segment_ids,
      deterministic,
      decode,
      encoded,
      encoder_segment_ids,
      self.causal,
      self.cross,
    )
    return x if c.block == 'post_norm' else _norm(c, 'final_norm')(x)
