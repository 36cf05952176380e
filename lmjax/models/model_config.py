"""`ModelConfig`: everything a model family's modules read, in one frozen object.

The ml_collections section `config.model` is what a user sets; `ModelConfig`
is what the Flax modules hold (as flax examples/lm1b's TransformerConfig and
nanoGPT's GPTConfig do): resolved once (padded vocabulary, the encoder's
[MASK], dtypes), frozen and hashable, since it is a field of every module.
"""

import dataclasses
from typing import Any

import jax.numpy as jnp


def padded_vocab_size(vocab_size: int, multiple: int) -> int:
  multiple = max(1, int(multiple))
  return -(-vocab_size // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The resolved model settings every module of a family reads (see lmjax.config
  for what each setting means). Build it with `from_config`; the defaults are
  those of lmjax.config's base config, for tests that construct one directly."""

  vocab_size: int  # embedding rows: tokenizer's vocabulary (+1 [MASK] for 'encoder'), padded
  max_len: int  # context: learned position table rows and the decode cache length
  family: str = 'transformer'  # 'transformer', 'encoder', or a recurrent cell
  num_layers: int = 4  # Transformer blocks / recurrent layers
  num_heads: int = 4  # attention heads
  embed_dim: int = 128  # residual stream width / recurrent models' embedding size
  mlp_dim: int = 0  # MLP hidden width; 0 = `mlp_hidden_dim`'s default for `mlp`
  mlp: str = 'gelu'  # 'gelu' or 'swiglu'
  positions: str = 'learned'  # 'learned' or 'rope'
  norm: str = 'layernorm'  # 'layernorm' or 'rmsnorm'
  dropout: float = 0.0  # embeddings, residual branches / between recurrent layers
  tie_embeddings: bool = True  # the output projection is the input embedding
  remat: str = 'none'  # activation checkpointing of whole blocks (transformer.REMAT_POLICIES)
  scan_layers: bool = True  # Transformer blocks under nn.scan (params['blocks'], stacked)
  attention: str = 'auto'  # the attention kernel (layers.ATTENTION_KERNELS)
  hidden_dim: int = 0  # recurrent hidden units per layer (from_config turns 0 into embed_dim)
  init_scale: float = 0.0  # recurrent: uniform(-s, s) for every parameter; 0 = 1/sqrt(hidden)
  dtype: Any = jnp.float32  # compute dtype
  param_dtype: Any = jnp.float32  # parameter storage dtype
  norm_eps: float = 0.0  # 0 = the norm's default (1e-5 layernorm, 1e-6 rmsnorm)
  block: str = 'pre_norm'  # or 'post_norm' (BERT)
  num_kv_heads: int = 0  # grouped-query attention (0 = num_heads)
  head_dim: int = 0  # 0 = embed_dim / num_heads
  bias: bool = False  # biases on every projection
  qkv_bias: bool = False  # biases on the query/key/value projections
  rope_theta: float = 10_000.0
  rope_scaling: tuple = ()  # ('llama3', factor, low_freq, high_freq, original_max_len)
  type_vocab_size: int = 0  # BERT token types
  head_transform: bool = False  # BERT's masked-LM head transform
  output_bias: bool = False
  mask_id: int = -1  # the encoder's [MASK] (-1: the id after the tokenizer's vocabulary)

  @classmethod
  def from_config(cls, model_config, vocab_size: int, max_len: int) -> 'ModelConfig':
    """From the ml_collections section `config.model`; `vocab_size` is the
    tokenizer's (the encoder adds [MASK] after it, then it is padded to
    model.vocab_multiple)."""
    mask_id = model_config.mask_id
    if model_config.family == 'encoder' and mask_id < 0:
      mask_id = vocab_size
      vocab_size += 1  # [MASK]
    if model_config.vocab_size:
      if model_config.vocab_size < vocab_size:
        raise ValueError(
          f'model.vocab_size={model_config.vocab_size} is smaller than the tokenizer '
          f'needs ({vocab_size} ids)'
        )
      vocab_size = model_config.vocab_size
    else:
      vocab_size = padded_vocab_size(vocab_size, model_config.vocab_multiple)
    scaling = model_config.rope_scaling
    return cls(
      vocab_size=vocab_size,
      max_len=model_config.max_len or max_len,
      family=model_config.family,
      num_layers=model_config.num_layers,
      num_heads=model_config.num_heads,
      embed_dim=model_config.embed_dim,
      mlp_dim=model_config.mlp_dim,
      mlp=model_config.mlp,
      positions=model_config.positions,
      norm=model_config.norm,
      dropout=model_config.dropout,
      tie_embeddings=model_config.tie_embeddings,
      remat=model_config.remat,
      scan_layers=model_config.scan_layers,
      attention=model_config.attention,
      hidden_dim=model_config.hidden_dim or model_config.embed_dim,
      init_scale=model_config.init_scale,
      dtype=jnp.dtype(model_config.dtype),
      param_dtype=jnp.dtype(model_config.param_dtype),
      norm_eps=model_config.norm_eps,
      block=model_config.block,
      num_kv_heads=model_config.num_kv_heads,
      head_dim=model_config.head_dim,
      bias=model_config.bias,
      qkv_bias=model_config.qkv_bias,
      rope_theta=model_config.rope_theta,
      rope_scaling=(
        (
          scaling.kind,
          scaling.factor,
          scaling.low_freq_factor,
          scaling.high_freq_factor,
          scaling.original_max_len,
        )
        if scaling.kind
        else ()
      ),
      type_vocab_size=model_config.type_vocab_size,
      head_transform=model_config.head_transform,
      output_bias=model_config.output_bias,
      mask_id=mask_id,
    )

  @property
  def causal(self) -> bool:
    # Derived, not a field, so that it cannot disagree with the family.
    return self.family != 'encoder'

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  @property
  def attention_head_dim(self) -> int:
    return self.head_dim or self.embed_dim // self.num_heads

  @property
  def mlp_hidden_dim(self) -> int:
    """The Transformer MLP's hidden width."""
    if self.mlp_dim:
      return self.mlp_dim
    if self.mlp == 'swiglu':  # Same parameter count as a 4x GELU MLP.
      return int(8 * self.embed_dim / 3 + 63) // 64 * 64
    return 4 * self.embed_dim
