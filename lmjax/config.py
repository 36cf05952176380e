"""Loading, checking and saving ml_collections configs.

Configs are Python files defining `get_config(arg=None)` (big_vision / Flax
examples style); `--config configs/x.py:arg` passes `arg`, and
`--config.a.b=value` overrides one field. The ConfigDict is locked, so a typo
fails, and `check_overrides` makes that failure name the valid keys before
absl's parser gets a chance to print a traceback.
"""

import importlib.util
import json
import os
import re
import sys
from collections.abc import Sequence

import ml_collections


class ConfigError(ValueError):
  """A config file or override that cannot be used."""


def import_file(path: str, name: str = '_lmjax_config'):
  """The Python module at `path` (config files need not be on sys.path; one may
  share settings with a sibling: `import_file(os.path.join(os.path.dirname(__file__), ...))`)."""
  if not os.path.isfile(path):
    raise ConfigError(f'config file {path!r} does not exist')
  module_spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """Loads `path.py` or `path.py:arg` and returns its `get_config(arg)`."""
  path, _, arg = spec.partition(':')
  module = import_file(path)
  if not hasattr(module, 'get_config'):
    raise ConfigError(f'config file {path!r} defines no get_config()')
  return module.get_config(arg) if arg else module.get_config()


def _valid_keys(node) -> str:
  return ', '.join(sorted(node.keys()))


def check_key_path(config: ml_collections.ConfigDict, dotted: str) -> None:
  """Raises ConfigError naming the valid keys if `a.b.c` is not in `config`."""
  node, walked = config, []
  for key in dotted.split('.'):
    if not isinstance(node, (ml_collections.ConfigDict, dict)) or key not in node:
      where = '.'.join(walked) or 'the config root'
      valid = (
        _valid_keys(node)
        if isinstance(node, (ml_collections.ConfigDict, dict))
        else (f'none: {".".join(walked)} is a value, not a section')
      )
      raise ConfigError(
        f'unknown config key {dotted!r}: {key!r} is not in {where}; valid keys there: {valid}'
      )
    node = node[key]
    walked.append(key)


def get(config: ml_collections.ConfigDict, dotted: str):
  """The value at `a.b.c`."""
  node = config
  for key in dotted.split('.'):
    node = node[key]
  return node


def set_value(config: ml_collections.ConfigDict, dotted: str, value) -> None:
  """Sets `a.b.c` to `value`; raises ConfigError naming the valid keys if it is unknown."""
  check_key_path(config, dotted)
  *parents, leaf = dotted.split('.')
  node = get(config, '.'.join(parents)) if parents else config
  node[leaf] = value


_OVERRIDE = re.compile(r'^--?config\.([^=]+)(=.*)?$')


def config_spec_from_argv(argv: Sequence[str], flag: str = 'config') -> str | None:
  for i, arg in enumerate(argv):
    for prefix in (f'--{flag}=', f'-{flag}='):
      if arg.startswith(prefix):
        return arg[len(prefix) :]
    if arg in (f'--{flag}', f'-{flag}') and i + 1 < len(argv):
      return argv[i + 1]
  return None


def check_overrides(argv: Sequence[str]) -> None:
  """Checks every `--config.a.b[=v]` in argv against the config file's keys."""
  spec = config_spec_from_argv(argv)
  overrides = [m.group(1) for m in map(_OVERRIDE.match, argv) if m]
  if spec is None or not overrides:
    return
  config = load_config_file(spec)
  for dotted in overrides:
    check_key_path(config, dotted)


def define_config_flag(default: str | None = None) -> None:
  """Defines the locked `--config` flag of an entry point, after checking every
  `--config.*` override in sys.argv: a mistyped key exits here, naming the
  valid ones, before anything runs."""
  from ml_collections import config_flags

  try:
    check_overrides(sys.argv[1:])
  except ConfigError as error:
    sys.exit(f'error: {error}')
  config_flags.DEFINE_config_file(
    'config', default, 'Config file (configs/x.py[:arg]).', lock_config=True
  )


def to_json(config: ml_collections.ConfigDict) -> str:
  return config.to_json_best_effort(indent=2, sort_keys=True)


def from_json(text_or_dict) -> ml_collections.ConfigDict:
  """A config saved by `to_json` (as text, or already parsed), on top of today's
  defaults, so a checkpoint written before a key existed still reads."""
  data = json.loads(text_or_dict) if isinstance(text_or_dict, str) else text_or_dict
  config = base_config()
  if isinstance(data.get('model'), dict) and 'scan_layers' not in data['model']:
    config.model.scan_layers = False  # saved before scanned blocks: the loop's layout

  def merge(node, values):
    for key, value in values.items():
      if isinstance(value, dict) and isinstance(node.get(key), ml_collections.ConfigDict):
        merge(node[key], value)
      else:
        node[key] = value

  merge(config, data)
  return config


def save(config: ml_collections.ConfigDict, workdir: str) -> str:
  from lmjax import fs  # here, not at the top: loading a config needs no TensorFlow

  path = os.path.join(workdir, 'config.json')
  with fs.open(path, 'w') as f:
    f.write(to_json(config) + '\n')
  return path


def base_config() -> ml_collections.ConfigDict:
  """Every key lmjax knows, with its default. Config files start from this."""
  c = ml_collections.ConfigDict()
  c.seed = 0  # Seeds parameter init, dropout and data order.
  c.parallelism = 'mesh'  # 'mesh' (jit over config.mesh) or 'pmap' (replicated, data parallel).
  # Persistent XLA compilation cache: a second run skips compiling ('' = off).
  c.compilation_cache_dir = '~/.cache/lmjax/xla'
  # CPU: XLA devices to split this host into, for data parallelism over its cores
  # (0 = one device; -1 = one per core for Transformers, 1 for recurrent models;
  # N = N; see cpu_host for what a split gains and risks).
  c.cpu_devices = 0

  # 'lm' (next token, causal models), 'mlm' (masked tokens, model.family='encoder'),
  # 'classify' (a label per text, any family; see `classify`) or 'seq2seq' (a
  # target text per source text: summarization; see `seq2seq`).
  c.task = 'lm'
  # Fine-tune from a pre-training run: 'WORKDIR' or 'WORKDIR:STEP' (latest, best
  # or a number); its tokenizer is used, its parameters restored (see `finetune`).
  c.init_from = ''

  c.data = ml_collections.ConfigDict()
  c.data.name = 'python_stdlib'  # tfds corpus name ('python_stdlib' is embedded), or 'files'.
  c.data.text_key = 'text'  # Text feature of the tfds corpus.
  # task='seq2seq': the source and target text features (tfds: e.g. cnn_dailymail's
  # 'article' and 'highlights') or fields (CSV/TSV/JSONL files).
  c.data.source_key = 'source'
  c.data.target_key = 'target'
  c.data.data_dir = ''  # tfds data_dir; '' = $TFDS_DATA_DIR or ~/tensorflow_datasets.
  # Token stores (lmjax.data.store): every split tokenized once, reused by later runs;
  # '' = DATA_DIR/lmjax_tokens inside the tfds data_dir (so on gs:// on TPU).
  c.data.cache_dir = ''
  c.data.store_shards = 4  # Shards of each split's token store (the unit of parallel preparation).
  c.data.manual_dir = ''  # Local copies of a tfds corpus' downloads, to build it offline.
  c.data.download = True  # Let tfds download a corpus that is not prepared (False = fail at once).
  c.data.train_split = 'train'  # Split (tfds split syntax) to train on.
  c.data.eval_split = 'validation'  # Split to evaluate on.
  c.data.files = ''  # With name='files': glob of the training text files.
  c.data.validation_files = ''  # With name='files': validation glob ('' = carve from files).
  c.data.test_files = ''  # With name='files': test glob ('' = carve from files).
  c.data.validation_fraction = 0.1  # Share of files carved out for validation (no glob).
  c.data.test_fraction = 0.0  # Share of files carved out for test (no glob; 0 = no test split).
  c.data.documents = ''  # Cut records into 'paragraphs' or 'lines' ('' = a record is a document).
  c.data.seq_len = 128  # Tokens per training example (the context length).
  c.data.layout = (
    'windows'  # 'windows', 'packed' (documents apart) or 'stream' (see lmjax.data.pipeline).
  )
  c.data.append_eos = True  # Append the end-of-document token to every document.
  c.data.invalid_utf8 = 'error'  # Local files: 'error' (naming file and byte offset) or 'replace'.
  c.data.clean = ml_collections.ConfigDict()  # Same cleaning for training, evaluation, prompts.
  c.data.clean.nfkc = False  # Unicode NFKC normalisation.
  c.data.clean.lowercase = False  # Lower-case everything.
  c.data.clean.strip_control = False  # Remove control characters (tab, newline, CR kept).
  c.data.clean.drop_empty_lines = False  # Remove blank lines.
  c.data.clean.min_doc_chars = 1  # Drop documents shorter than this after cleaning.

  c.mlm = ml_collections.ConfigDict()  # task='mlm': BERT-style masking, in tf.data.
  c.mlm.mask_rate = 0.15  # Share of tokens chosen for prediction.
  c.mlm.mask_fraction = 0.8  # Chosen tokens replaced by [MASK] ...
  c.mlm.random_fraction = 0.1  # ... or by a random token (the rest stay unchanged).

  c.classify = ml_collections.ConfigDict()  # task='classify': labelled texts.
  c.classify.label_key = 'label'  # Label feature (tfds) or column (CSV/TSV/JSONL files).
  c.classify.num_classes = 0  # Classes (0 = from the training labels).
  c.classify.label_names = ''  # Comma-separated names of text labels, in class order ('' = sorted).
  c.classify.pooling = (
    'auto'  # 'mean', 'first' or 'last' token ('auto': mean for encoders, else last).
  )

  c.seq2seq = ml_collections.ConfigDict()  # task='seq2seq': (source, target) text pairs.
  c.seq2seq.max_target_tokens = 64  # Target tokens kept (and generated), before the end token.
  # Rows: 'packed' (pairs side by side, attention kept within each), 'single' (one
  # pair per row) or 'auto' (packed for Transformers; single for recurrent models,
  # whose state would run from one pair into the next).
  c.seq2seq.rows = 'auto'
  # model.family='encoder_decoder': decoder row length (0 = max_target_tokens + 1);
  # the encoder reads rows of data.seq_len.
  c.seq2seq.target_len = 0
  # Decoder-only models read `source SEP target EOS`: SEP is '' (one new token after
  # the tokenizer's vocabulary) or this text, tokenized (e.g. ' TL;DR: ' for an
  # imported model, whose vocabulary is fixed).
  c.seq2seq.separator = ''
  # Generation for ROUGE: 0 = greedy (or sampled, see temperature); k >= 1: beam search.
  c.seq2seq.beam_size = 0
  c.seq2seq.length_penalty = 0.0  # Beam search: GNMT's alpha (0 = none; 0.6-1 favours longer).
  c.seq2seq.temperature = 0.0  # Without beam search: 0 = greedy, else sampled at this temperature.
  c.seq2seq.eval_examples = 64  # Evaluation: examples generated for ROUGE (-1 = all, 0 = none).

  c.finetune = ml_collections.ConfigDict()  # With init_from.
  c.finetune.mode = 'full'  # 'full', 'frozen' (only the new head trains) or 'lora'.
  c.finetune.lora_rank = 8  # LoRA: rank of each adapter.
  c.finetune.lora_alpha = 16.0  # LoRA: the adapters' update is scaled by alpha / rank.
  c.finetune.lora_targets = (
    r'(qkv|query|key_value|out|up|down|gate_up)/kernel$'  # LoRA: regex over parameter paths.
  )

  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.kind = 'bytes'  # 'bytes', 'chars', 'words', 'sentencepiece' or 'huggingface'.
  # sentencepiece: a given .model ('' = train one on train_split); huggingface: a
  # model directory or its tokenizer.json.
  c.tokenizer.model_file = ''
  c.tokenizer.vocab_size = 4096  # sentencepiece: vocabulary size to train.
  c.tokenizer.model_type = 'bpe'  # sentencepiece: 'bpe' or 'unigram'.
  c.tokenizer.sample_chars = 10_000_000  # Characters of training text a vocabulary is built from.
  c.tokenizer.word_split = (
    'whitespace'  # words: 'whitespace' (pre-tokenized, PTB) or 'punctuation'.
  )
  c.tokenizer.max_size = 0  # words: vocabulary size cap, specials included (0 = every word).
  c.tokenizer.min_count = 1  # words: rarer words become <unk>.

  c.model = ml_collections.ConfigDict()
  # 'transformer' (causal), 'encoder' (bidirectional), 'encoder_decoder' (seq2seq,
  # T5/BART-style), or recurrent: 'rnn' (Elman, tanh), 'lstm', 'gru'.
  c.model.family = 'transformer'
  c.model.num_layers = 4  # Transformer blocks / recurrent layers.
  c.model.num_heads = 4  # Attention heads.
  c.model.embed_dim = 128  # Residual stream width / recurrent models' embedding size.
  c.model.hidden_dim = 0  # Recurrent models: hidden units per layer (0 = embed_dim).
  c.model.init_scale = (
    0.0  # Recurrent models: uniform(-s, s) init of every parameter (0 = 1/sqrt(hidden)).
  )
  c.model.mlp_dim = 0  # MLP hidden width (0 = 4 * embed_dim, or 8/3 * embed_dim for swiglu).
  c.model.mlp = 'gelu'  # 'gelu' (tanh approximation, GPT-2), 'gelu_exact' (BERT) or 'swiglu'.
  c.model.positions = 'learned'  # 'learned' or 'rope'.
  c.model.norm = 'layernorm'  # 'layernorm' or 'rmsnorm'.
  c.model.norm_eps = 0.0  # Norm epsilon (0 = 1e-5 for layernorm, 1e-6 for rmsnorm).
  c.model.block = 'pre_norm'  # 'pre_norm', or 'post_norm' (BERT: norm after each residual sum).
  c.model.num_kv_heads = 0  # Grouped-query attention: key/value heads (0 = num_heads).
  c.model.head_dim = 0  # Width of each attention head (0 = embed_dim / num_heads).
  c.model.bias = False  # Biases on every projection (GPT-2, BERT).
  c.model.qkv_bias = False  # Biases on the query, key and value projections only (Qwen2).
  c.model.rope_theta = 10_000.0  # RoPE base.
  c.model.rope_scaling = ml_collections.ConfigDict()  # RoPE frequency scaling.
  c.model.rope_scaling.kind = ''  # '' (none) or 'llama3'.
  c.model.rope_scaling.factor = 8.0
  c.model.rope_scaling.low_freq_factor = 1.0
  c.model.rope_scaling.high_freq_factor = 4.0
  c.model.rope_scaling.original_max_len = 8192
  c.model.type_vocab_size = 0  # BERT token types: > 0 adds type 0's embedding to every token.
  c.model.head_transform = False  # BERT's masked-LM head: dense, activation, norm, then output.
  c.model.output_bias = False  # A bias on the output logits (BERT).
  c.model.max_len = 0  # Positions: learned table rows and the decode cache (0 = data.seq_len).
  # Embedding rows (0 = the tokenizer's vocabulary, [MASK] added for encoders,
  # padded to vocab_multiple); an imported model's own, at least the tokenizer's.
  c.model.vocab_size = 0
  c.model.mask_id = -1  # The encoder's [MASK] id (-1 = one more id after the tokenizer's).
  c.model.dropout = 0.0  # Dropout on embeddings and residual branches.
  c.model.tie_embeddings = True  # Share the input embedding with the output projection.
  c.model.vocab_multiple = 1  # Pad the vocabulary to a multiple of this (e.g. 128 on TPU).
  c.model.remat = (
    'none'  # Transformer blocks: 'none', 'full' (recompute all) or 'dots' (keep matmuls).
  )
  # Transformer blocks under nn.scan: one compiled block whatever the depth, the
  # parameters stacked on a leading 'layers' axis under params['blocks'] (False: a
  # Python loop, params['block_0'], ...; runs saved before this key had it).
  c.model.scan_layers = True
  # The attention kernel: 'auto' (TPU: the Pallas splash kernel where data.seq_len
  # is a multiple of 128; GPU: cuDNN flash attention in bf16/fp16; else 'xla'),
  # 'xla' (the written-out softmax), 'cudnn' or 'splash' (off a TPU: interpreted).
  c.model.attention = 'auto'
  c.model.dtype = 'float32'  # Compute dtype ('bfloat16' for mixed precision).
  c.model.param_dtype = 'float32'  # Parameter storage dtype.

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = 'adamw'  # 'adamw', 'adam', 'sgd', 'rmsprop' or 'adafactor'.
  c.optimizer.learning_rate = 1e-3  # Peak learning rate.
  c.optimizer.schedule = 'cosine'  # 'constant', 'linear', 'cosine', 'rsqrt' or 'epochs'.
  c.optimizer.decay_after_epochs = 4  # 'epochs': the peak holds this many epochs, then ...
  c.optimizer.decay_factor = 0.5  # ... is multiplied by this at the start of every later epoch.
  c.optimizer.warmup_steps = 100  # Linear warm-up from 0 to the peak (not for 'epochs').
  c.optimizer.min_learning_rate = 1e-4  # End of linear/cosine decay.
  c.optimizer.b1 = 0.9  # Adam(W) beta1.
  c.optimizer.b2 = 0.99  # Adam(W) beta2; RMSprop decay.
  c.optimizer.eps = 1e-8  # Adam(W)/RMSprop epsilon.
  c.optimizer.momentum = 0.9  # SGD/RMSprop momentum (0 = none).
  c.optimizer.nesterov = False  # SGD: Nesterov momentum.
  c.optimizer.weight_decay = (
    0.1  # Decoupled for adamw/adafactor, L2 otherwise; skips norms and biases.
  )
  c.optimizer.grad_clip = 1.0  # Global-norm clipping (0 = off).

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 16  # Global batch size (all hosts and devices).
  c.train.num_steps = 1000  # Optimizer steps (the schedule's length).
  c.train.microbatches = 1  # Gradient accumulation: microbatches per step (inside the jitted step).
  c.train.num_epochs = 0  # > 0: train this many passes over the split (instead of num_steps).
  c.train.carry_state = (
    True  # Recurrent models, stream layout: carry the hidden state across steps.
  )
  c.train.loss_normalization = (
    'tokens'  # 'tokens' (mean), or 'rows' (summed over time, mean over rows: Zaremba et al.).
  )
  c.train.stop_at = 0  # Stop with a checkpoint at this step, to resume later (0 = num_steps).
  c.train.log_every = 50  # Steps between progress lines and metric records.
  c.train.eval_every = 250  # Steps between evaluations (0 = only at the end).
  # > 0: trace this many steps after the first (which compiles) with jax.profiler,
  # into WORKDIR/tensorboard (TensorBoard's Profile tab; needs tensorboard-plugin-profile).
  c.train.profile_steps = 0
  # A train step, evaluation batch or save that makes no progress for this long
  # ends the run with an error naming the step and phase (a stuck collective);
  # the first step, which compiles, gets 4x. 0 = wait forever.
  c.train.phase_timeout_s = 600.0
  # After a SIGTERM, the process ends within this long even if it is stuck.
  c.train.sigterm_grace_s = 120.0
  c.train.eval_batches = 50  # Batches per periodic evaluation (-1 = whole split).
  c.train.final_eval_batches = -1  # Batches for the final evaluation (-1 = whole split).
  c.train.eval_batch_size = 32  # Global batch size for evaluation.

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 500  # Steps between checkpoints (a final one is always saved).
  c.checkpoint.keep = 3  # Most recent checkpoints kept.
  c.checkpoint.async_save = True  # Save in the background while training goes on.
  c.checkpoint.keep_best = True  # Also keep the step with the best validation loss (--step best).

  c.sample = ml_collections.ConfigDict()
  c.sample.prompt = ''  # Printed at the end of training ('' = start of a document).
  c.sample.max_new_tokens = 200  # Tokens generated.
  c.sample.temperature = 0.8  # Softmax temperature (0 = greedy).
  c.sample.top_k = 40  # Sample from the k most likely tokens (0 = all).
  c.sample.top_p = 1.0  # Nucleus: sample within this cumulative probability (1 = all).
  c.sample.seed = 0  # Sampling seed.

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # Data-parallel axis size (-1 = the remaining devices).
  c.mesh.fsdp = 1  # Parameter/optimizer sharding axis size.
  c.mesh.tensor = 1  # Tensor-parallel axis size (heads, MLP width).
  return c
