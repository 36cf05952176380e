"""Model registry: `build_model(model_config, vocab_size, max_len)` for every family.

Families: 'transformer' (causal decoder), 'encoder' (bidirectional Transformer
for the masked-LM objective; its vocabulary has one more token, [MASK], after
the tokenizer's), 'encoder_decoder' (text-to-text, T5/BART-style), and the
recurrent cells. `num_classes` > 0 wraps any of them
in a sequence classifier (lmjax.models.classifier). Every module reads its
settings from one resolved `ModelConfig` (lmjax.models.model_config)."""

import jax

from lmjax.models import classifier
from lmjax.models import model_config as model_config_lib
from lmjax.models import recurrent
from lmjax.models import transformer

FAMILIES = ('transformer', 'encoder', 'encoder_decoder') + recurrent.CELLS
ModelConfig = model_config_lib.ModelConfig
padded_vocab_size = model_config_lib.padded_vocab_size
is_recurrent = recurrent.is_recurrent  # defined there, so that the classifier can ask it too


def mask_token_id(model_config, vocab_size: int) -> int:
  """The encoder's [MASK] token: model.mask_id (an imported tokenizer's), else the
  id after the tokenizer's vocabulary."""
  if model_config.family != 'encoder':
    raise ValueError(
      f"the masked-LM objective needs model.family='encoder'; got {model_config.family!r}"
    )
  return model_config.mask_id if model_config.mask_id >= 0 else vocab_size


def build_model(
  model_config, vocab_size: int, max_len: int, num_classes: int = 0, pooling: str = 'auto'
):
  """The configured Flax module; `vocab_size` comes from the tokenizer. With
  `num_classes`, a classifier over the family's hidden states; `pooling` 'auto'
  means 'mean' for the encoder and 'last' for causal and recurrent models."""
  language_model = _language_model(ModelConfig.from_config(model_config, vocab_size, max_len))
  if not num_classes:
    return language_model
  if pooling == 'auto':
    pooling = 'mean' if model_config.family == 'encoder' else 'last'
  return classifier.Classifier(backbone=language_model, num_classes=num_classes, pooling=pooling)


def _language_model(config: ModelConfig):
  if config.family in ('transformer', 'encoder'):
    return transformer.TransformerLM(config)
  if config.family == 'encoder_decoder':
    return transformer.EncoderDecoder(config)
  if config.family in recurrent.CELLS:
    return recurrent.RecurrentLM(config)
  raise ValueError(f'unknown model.family {config.family!r}; known: {", ".join(FAMILIES)}')


def is_encoder_decoder(model) -> bool:
  """Encoder-decoders take the encoder's batch (encoder_inputs, ...) too."""
  return getattr(model, 'encoder_decoder', False)


def count_params(params) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))
