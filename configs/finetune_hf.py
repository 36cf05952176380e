"""Fine-tune a model imported from Hugging Face (`python -m lmjax.hf import`).

The argument is the imported run: its model and tokenizer settings are taken
as they are (a fine-tuning config must build the pre-trained model), and
`init_from` points at it. Choose the data, the mode and the length with
overrides, e.g. LoRA on a tfds corpus:

  python -m lmjax.hf import --hf_dir ~/models/gpt2 --workdir runs/gpt2
  python -m lmjax.train --config configs/finetune_hf.py:runs/gpt2 --workdir runs/gpt2_lora \
      --config.data.name=tiny_shakespeare --config.finetune.mode=lora
"""

from lmjax import config as config_lib
from lmjax import fs


def get_config(imported: str = ''):
  if not imported:
    raise config_lib.ConfigError(
      'configs/finetune_hf.py needs the imported run: --config configs/finetune_hf.py:WORKDIR'
    )
  with fs.open(fs.join(imported, 'config.json')) as f:
    c = config_lib.from_json(f.read())
  c.init_from = imported
  c.finetune.mode = 'lora'
  c.optimizer.learning_rate = 3e-4
  c.optimizer.warmup_steps = 50
  c.optimizer.min_learning_rate = 3e-5
  c.train.num_steps = 1000
  c.train.eval_every = 250
  c.checkpoint.every = 250
  c.sample.max_new_tokens = 100
  return c
