"""Model registry: `build_model(model_config, vocab_size, max_len)` for every family.

Families: 'transformer' (causal decoder), 'encoder' (bidirectional Transformer
for the masked-LM objective; its vocabulary has one more token, [MASK], after
the tokenizer's), and the recurrent cells. `num_classes` > 0 wraps any of them
in a sequence classifier (lmjax.models.classifier)."""

import jax
import jax.numpy as jnp

from lmjax.models import classifier
from lmjax.models import recurrent
from lmjax.models import transformer

FAMILIES = ('transformer', 'encoder') + recurrent.CELLS


def mask_token_id(model_config, vocab_size: int) -> int:
  """The encoder's [MASK] token: the id after the tokenizer's vocabulary."""
  if model_config.family != 'encoder':
    raise ValueError(
      f"the masked-LM objective needs model.family='encoder'; got {model_config.family!r}"
    )
  return vocab_size


def padded_vocab_size(vocab_size: int, multiple: int) -> int:
  multiple = max(1, int(multiple))
  return -(-vocab_size // multiple) * multiple


def build_model(
  model_config, vocab_size: int, max_len: int, num_classes: int = 0, pooling: str = 'auto'
):
  """The configured Flax module; `vocab_size` comes from the tokenizer. With
  `num_classes`, a classifier over the family's hidden states; `pooling` 'auto'
  means 'mean' for the encoder and 'last' for causal and recurrent models."""
  language_model = _language_model(model_config, vocab_size, max_len)
  if not num_classes:
    return language_model
  if pooling == 'auto':
    pooling = 'mean' if model_config.family == 'encoder' else 'last'
  return classifier.Classifier(
    backbone=language_model,
    num_classes=num_classes,
    pooling=pooling,
    dropout=model_config.dropout,
    dtype=jnp.dtype(model_config.dtype),
    param_dtype=jnp.dtype(model_config.param_dtype),
  )


def _language_model(model_config, vocab_size: int, max_len: int):
  dtype = jnp.dtype(model_config.dtype)
  param_dtype = jnp.dtype(model_config.param_dtype)
  if model_config.family == 'encoder':
    vocab_size += 1  # [MASK]
  vocab_size = padded_vocab_size(vocab_size, model_config.vocab_multiple)
  if model_config.family in ('transformer', 'encoder'):
    return transformer.TransformerLM(
      vocab_size=vocab_size,
      max_len=max_len,
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
      causal=model_config.family == 'transformer',
      dtype=dtype,
      param_dtype=param_dtype,
    )
  if model_config.family in recurrent.CELLS:
    return recurrent.RecurrentLM(
      vocab_size=vocab_size,
      cell=model_config.family,
      num_layers=model_config.num_layers,
      embed_dim=model_config.embed_dim,
      hidden_dim=model_config.hidden_dim or model_config.embed_dim,
      dropout=model_config.dropout,
      tie_embeddings=model_config.tie_embeddings,
      init_scale=model_config.init_scale,
      dtype=dtype,
      param_dtype=param_dtype,
    )
  raise ValueError(f'unknown model.family {model_config.family!r}; known: {", ".join(FAMILIES)}')


def is_recurrent(model) -> bool:
  """Recurrent models take and return a carry (see lmjax.models.recurrent)."""
  return getattr(model, 'recurrent', False)


def count_params(params) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))
