"""Model registry: `build_model(model_config, vocab_size, max_len)` for every family."""
import jax
import jax.numpy as jnp

from lmjax.models import recurrent
from lmjax.models import transformer

FAMILIES = ('transformer',) + recurrent.CELLS


def padded_vocab_size(vocab_size: int, multiple: int) -> int:
  multiple = max(1, int(multiple))
  return -(-vocab_size // multiple) * multiple


def build_model(model_config, vocab_size: int, max_len: int):
  """The configured Flax module; `vocab_size` comes from the tokenizer."""
  dtype = jnp.dtype(model_config.dtype)
  param_dtype = jnp.dtype(model_config.param_dtype)
  vocab_size = padded_vocab_size(vocab_size, model_config.vocab_multiple)
  if model_config.family == 'transformer':
    return transformer.TransformerLM(
        vocab_size=vocab_size, max_len=max_len, num_layers=model_config.num_layers,
        num_heads=model_config.num_heads, embed_dim=model_config.embed_dim,
        mlp_dim=model_config.mlp_dim, mlp=model_config.mlp,
        positions=model_config.positions, norm=model_config.norm,
        dropout=model_config.dropout, tie_embeddings=model_config.tie_embeddings,
        remat=model_config.remat, dtype=dtype, param_dtype=param_dtype)
  if model_config.family in recurrent.CELLS:
    return recurrent.RecurrentLM(
        vocab_size=vocab_size, cell=model_config.family, num_layers=model_config.num_layers,
        embed_dim=model_config.embed_dim,
        hidden_dim=model_config.hidden_dim or model_config.embed_dim,
        dropout=model_config.dropout, tie_embeddings=model_config.tie_embeddings,
        init_scale=model_config.init_scale, dtype=dtype, param_dtype=param_dtype)
  raise ValueError(f'unknown model.family {model_config.family!r}; '
                   f'known: {", ".join(FAMILIES)}')


def is_recurrent(model) -> bool:
  """Recurrent models take and return a carry (see lmjax.models.recurrent)."""
  return getattr(model, 'recurrent', False)


def count_params(params) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))
