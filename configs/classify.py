"""Text classification with the encoder of configs/mlm_shakespeare.py:
`--config configs/classify.py:SOURCE`, SOURCE one of

  imdb      tfds imdb_reviews (text, label: 2 classes)
  ag_news   tfds ag_news_subset (description, label: 4 classes)
  sst2      tfds glue/sst2 (sentence, label: 2 classes; evaluated on validation)
  files     local CSV/TSV/JSONL: --config.data.files=GLOB
            [--config.data.validation_files=GLOB]; columns data.text_key and
            classify.label_key (text labels are mapped to classes by
            classify.label_names, or sorted)

Fine-tune a pre-trained run with --config.init_from=WORKDIR[:STEP] and
--config.finetune.mode=full|frozen|lora (without init_from it trains from
scratch). tfds corpora must be prepared in the data_dir (no download at run
time). Metrics: accuracy, precision, recall, F1 (binary and macro), ROC AUC,
exact over the whole split; `python -m lmjax.evaluate --workdir WORKDIR`
writes them as JSON.
"""

import os

from lmjax import config as config_lib

shared = config_lib.import_file(
  os.path.join(os.path.dirname(__file__), 'mlm_shakespeare.py'), '_mlm_shakespeare'
)
SOURCES = {  # name: (tfds name, text feature, label feature, evaluation split)
  'imdb': ('imdb_reviews', 'text', 'label', 'test'),
  'ag_news': ('ag_news_subset', 'description', 'label', 'test'),
  'sst2': ('glue/sst2', 'sentence', 'label', 'validation'),
  'files': ('files', 'text', 'label', 'validation'),
}


def get_config(arg='files'):
  if arg not in SOURCES:
    raise config_lib.ConfigError(
      f'configs/classify.py:{arg}: unknown source; known: {", ".join(SOURCES)}'
    )
  name, text_key, label_key, eval_split = SOURCES[arg]
  c = shared.encoder(config_lib.base_config())
  c.task = 'classify'
  c.data.name = name
  c.data.text_key = text_key
  c.data.eval_split = eval_split
  c.classify.label_key = label_key
  c.model.dropout = 0.1
  c.optimizer.learning_rate = 3e-4
  c.optimizer.warmup_steps = 100
  c.optimizer.min_learning_rate = 3e-5
  c.optimizer.weight_decay = 0.01
  c.train.batch_size = 32
  c.train.num_steps = 2000
  c.train.log_every = 50
  c.train.eval_every = 500
  c.train.eval_batches = -1
  c.checkpoint.every = 500
  c.sample.max_new_tokens = 0
  return c
