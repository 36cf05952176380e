"""One pass over a run's config, right after the flags and before any I/O: every
choice among names, every number that must be positive, and the rules between
fields. A typo in `model.norm` used to surface only when the model was traced,
after both splits were tokenized (and sentencepiece maybe trained); now it is
the first thing a run says.

The lists of valid names are the modules' own (`packing.LAYOUTS`,
`train_state.OPTIMIZERS`, ...), so a new choice is added in one place.
"""

from lmjax import config as config_lib
from lmjax import finetune
from lmjax import models
from lmjax import steps
from lmjax import tasks
from lmjax import train_state
from lmjax.data import cleaning
from lmjax.data import packing
from lmjax.data import tokenizers
from lmjax.models import classifier
from lmjax.models import layers
from lmjax.models import transformer
from lmjax.tasks import seq2seq

DTYPES = ('float32', 'bfloat16', 'float16')

CHOICES = {
  'parallelism': steps.PARALLELISMS,
  'task': tasks.REGISTRY,  # read at each check: a task registered later is valid
  'data.layout': packing.LAYOUTS,
  'data.documents': tuple(cleaning.DOCUMENT_UNITS),
  'data.invalid_utf8': ('error', 'replace'),
  'classify.pooling': ('auto',) + classifier.POOLINGS,
  'seq2seq.rows': seq2seq.ROWS,
  'finetune.mode': finetune.MODES,
  'tokenizer.kind': tokenizers.KINDS,
  'tokenizer.model_type': ('bpe', 'unigram'),
  'tokenizer.word_split': tokenizers.WordTokenizer.SPLITS,
  'model.family': models.FAMILIES,
  'model.mlp': layers.MLPS,
  'model.norm': layers.NORMS,
  'model.positions': transformer.POSITIONS,
  'model.block': transformer.BLOCKS,
  'model.rope_scaling.kind': layers.ROPE_SCALINGS,
  'model.remat': tuple(transformer.REMAT_POLICIES),
  'model.attention': layers.ATTENTION_KERNELS,
  'model.dtype': DTYPES,
  'model.param_dtype': DTYPES,
  'optimizer.name': train_state.OPTIMIZERS,
  'optimizer.schedule': train_state.SCHEDULES,
  'train.loss_normalization': ('tokens', 'rows'),
}

POSITIVE = (
  'data.seq_len',
  'data.store_shards',
  'train.batch_size',
  'train.eval_batch_size',
  'train.log_every',
  'train.microbatches',
  'checkpoint.every',
  'model.num_layers',
  'model.embed_dim',
)


def check(config) -> None:
  """Raises config_lib.ConfigError naming the field, its value and what is valid."""
  for dotted, valid in CHOICES.items():
    value = config_lib.get(config, dotted)
    if value not in valid:
      names = ', '.join(str(v) if v else "''" for v in valid)
      raise config_lib.ConfigError(f'{dotted} must be one of {names}; got {value!r}')
  for dotted in POSITIVE:
    value = config_lib.get(config, dotted)
    if not isinstance(value, int) or value < 1:
      raise config_lib.ConfigError(f'{dotted} must be a positive integer; got {value!r}')
  for dotted in ('train.profile_steps', 'train.num_epochs', 'train.stop_at'):
    value = config_lib.get(config, dotted)
    if not isinstance(value, int) or value < 0:
      raise config_lib.ConfigError(f'{dotted} must be a non-negative integer; got {value!r}')
  if not 0.0 <= config.model.dropout < 1.0:
    raise config_lib.ConfigError(f'model.dropout must be in [0, 1); got {config.model.dropout}')
  if config.train.num_steps < 1 and config.train.num_epochs < 1:
    raise config_lib.ConfigError('train.num_steps (or train.num_epochs) must be positive')
  if config.model.family in ('transformer', 'encoder'):
    model = config.model
    if not model.head_dim and model.embed_dim % model.num_heads:
      raise config_lib.ConfigError(
        f'model.embed_dim={model.embed_dim} is not divisible by '
        f'model.num_heads={model.num_heads} (or set model.head_dim)'
      )
    if model.num_kv_heads < 0 or (model.num_kv_heads and model.num_heads % model.num_kv_heads):
      raise config_lib.ConfigError(
        f'model.num_heads={model.num_heads} must be a multiple of '
        f'model.num_kv_heads={model.num_kv_heads} (0 = num_heads)'
      )
  try:
    tasks.check(config)
  except ValueError as error:
    raise config_lib.ConfigError(str(error)) from None
