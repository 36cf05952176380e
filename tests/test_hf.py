"""Hugging Face interop against the real `transformers` package: tiny random
GPT-2, Llama (grouped-query attention, a non-default rope_theta, Llama 3 rope
scaling), Qwen2 and BERT models built from configs (no network), imported,
compared logit for logit and token for token, exported and loaded back."""

import json

import numpy as np
import pytest
from flax import traverse_util

from conftest import shakespeare_text
from conftest import tiny_config
from lmjax import config as config_lib
from lmjax import evaluate
from lmjax import hf
from lmjax import sample
from lmjax import steps
from lmjax.data import tokenizers as lmjax_tokenizers

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
hf_tokenizers = pytest.importorskip('tokenizers')

TEXT = shakespeare_text()[:60_000]


def byte_level_bpe(directory, vocab_size=384):
  """A GPT-2-style byte-level BPE trained on tiny-shakespeare, saved as a
  transformers tokenizer (tokenizer.json and its special tokens)."""
  from tokenizers import decoders
  from tokenizers import models
  from tokenizers import pre_tokenizers
  from tokenizers import trainers

  tok = hf_tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size,
    special_tokens=['<|endoftext|>'],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
  )
  tok.train_from_iterator(TEXT.splitlines(), trainer)
  fast = transformers.PreTrainedTokenizerFast(
    tokenizer_object=tok, eos_token='<|endoftext|>', bos_token='<|endoftext|>'
  )
  fast.save_pretrained(directory)
  return fast


def wordpiece(directory, vocab_size=400):
  """A BERT-style WordPiece vocabulary with [PAD] [UNK] [CLS] [SEP] [MASK]."""
  from tokenizers import decoders
  from tokenizers import models
  from tokenizers import normalizers
  from tokenizers import pre_tokenizers
  from tokenizers import processors
  from tokenizers import trainers

  specials = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]']
  tok = hf_tokenizers.Tokenizer(models.WordPiece(unk_token='[UNK]'))
  tok.normalizer = normalizers.BertNormalizer(lowercase=True)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tok.decoder = decoders.WordPiece()
  trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials)
  tok.train_from_iterator(TEXT.splitlines() + ['The capital of France is Paris.'] * 20, trainer)
  tok.post_processor = processors.TemplateProcessing(
    single='[CLS] $A [SEP]', special_tokens=[('[CLS]', 2), ('[SEP]', 3)]
  )
  fast = transformers.PreTrainedTokenizerFast(
    tokenizer_object=tok,
    unk_token='[UNK]',
    pad_token='[PAD]',
    cls_token='[CLS]',
    sep_token='[SEP]',
    mask_token='[MASK]',
  )
  fast.save_pretrained(directory)
  return fast


def randomised(model, seed=0):
  """Every parameter drawn at random (biases and norms too), so that a
  mapping that drops or transposes one shows in the logits."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, parameter in model.named_parameters():
      noise = torch.randn(parameter.shape, generator=generator) * 0.05
      parameter.copy_(1.0 + noise if 'norm' in name.lower() else noise)
  return model.eval()


def build(kind, directory):
  """(HF model, its tokenizer) of `kind`, saved to `directory`."""
  if kind == 'bert':
    tokenizer = wordpiece(directory)
    config = transformers.BertConfig(
      vocab_size=len(tokenizer),
      hidden_size=32,
      num_hidden_layers=2,
      num_attention_heads=4,
      intermediate_size=64,
      max_position_embeddings=64,
      type_vocab_size=2,
      hidden_dropout_prob=0.0,
      attention_probs_dropout_prob=0.0,
      pad_token_id=0,
    )
    model = transformers.BertForMaskedLM(config)
  else:
    tokenizer = byte_level_bpe(directory)
    vocab = len(tokenizer)
    eos = tokenizer.eos_token_id
    if kind == 'gpt2':
      config = transformers.GPT2Config(
        vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=eos,
        eos_token_id=eos, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
      )  # fmt: skip
      model = transformers.GPT2LMHeadModel(config)
    else:
      common = dict(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        bos_token_id=eos,
        eos_token_id=eos,
      )
      if kind == 'llama':  # grouped-query attention, a non-default theta, untied
        config = transformers.LlamaConfig(
          **common, num_key_value_heads=2, rope_theta=5000.0, tie_word_embeddings=False
        )
        model = transformers.LlamaForCausalLM(config)
      elif kind == 'llama3':  # Llama 3.1's rope scaling
        scaling = {
          'rope_type': 'llama3',
          'factor': 8.0,
          'low_freq_factor': 1.0,
          'high_freq_factor': 4.0,
          'original_max_position_embeddings': 16,
        }
        config = transformers.LlamaConfig(
          **common, num_key_value_heads=1, rope_theta=500000.0, rope_scaling=scaling
        )
        model = transformers.LlamaForCausalLM(config)
      else:  # qwen2: query/key/value biases, tied, grouped
        config = transformers.Qwen2Config(
          **common, num_key_value_heads=2, tie_word_embeddings=True, use_sliding_window=False
        )
        model = transformers.Qwen2ForCausalLM(config)
  model = randomised(model)
  model.save_pretrained(directory)
  return model, tokenizer


def imported(directory, workdir, seq_len=64):
  base = config_lib.base_config()
  base.data.seq_len = seq_len
  summary = hf.import_model(str(directory), str(workdir), base, log=lambda m: None)
  return summary, evaluate.restore_for_inference(str(workdir), log=lambda m: None)


def lmjax_logits(restored, ids):
  logits, _ = steps.apply_model(
    restored.model, restored.params, {'inputs': np.asarray(ids, np.int32)}, deterministic=True
  )
  return np.asarray(logits, np.float32)


def hf_logits(model, ids):
  with torch.no_grad():
    return model(torch.tensor(np.asarray(ids), dtype=torch.long)).logits.numpy()


def text_batch(tokenizer, rows=2, length=48):
  ids = tokenizer(TEXT[1000:4000], add_special_tokens=False)['input_ids']
  return np.array([ids[i * length : (i + 1) * length] for i in range(rows)])


@pytest.mark.parametrize('kind', ['gpt2', 'llama', 'llama3', 'qwen2'])
def test_imported_causal_models_give_the_same_logits_and_greedy_text(kind, tmp_path):
  model, tokenizer = build(kind, tmp_path / 'hf')
  summary, restored = imported(tmp_path / 'hf', tmp_path / 'run')
  assert summary['architecture'] == {'llama3': 'llama'}.get(kind, kind)
  assert restored.tokenizer.kind == 'huggingface'
  ids = text_batch(tokenizer)
  ours, theirs = lmjax_logits(restored, ids), hf_logits(model, ids)
  assert ours[..., : theirs.shape[-1]].shape == theirs.shape
  assert np.abs(ours - theirs).max() < 1e-4
  # Greedy generation of 20 tokens (lmjax: its key/value cache; transformers: its own).
  prompt = ids[0, :12]
  ours = sample.generate(
    restored.params,
    restored.model,
    prompt,
    20,
    vocab_size=restored.tokenizer.vocab_size,
    temperature=0.0,
  )[0]
  model.generation_config.eos_token_id = None  # 20 tokens, whatever they are
  with torch.no_grad():
    theirs = model.generate(
      torch.tensor(prompt[None]), max_new_tokens=20, do_sample=False, pad_token_id=0
    )[0, len(prompt) :].numpy()
  np.testing.assert_array_equal(ours, theirs)


def test_the_tokenizer_is_the_models_own_and_travels_with_the_run(tmp_path):
  _, tokenizer = build('gpt2', tmp_path / 'hf')
  _, restored = imported(tmp_path / 'hf', tmp_path / 'run')
  ours = restored.tokenizer
  texts = [TEXT[:300], 'Hello, world!  Whitespace\tand\nnewlines.']
  for text in texts:
    expected = tokenizer(text, add_special_tokens=False)['input_ids']
    np.testing.assert_array_equal(ours.encode(text), expected)
    assert ours.decode(ours.encode(text)) == text
  assert ours.eos_id == tokenizer.eos_token_id and ours.vocab_size == len(tokenizer)
  again = lmjax_tokenizers.from_json(json.loads(json.dumps(ours.to_json())))
  assert again.fingerprint() == ours.fingerprint()
  saved = lmjax_tokenizers.from_json(json.loads((tmp_path / 'run' / 'tokenizer.json').read_text()))
  assert saved.fingerprint() == ours.fingerprint()


def test_bert_masked_lm_loss_of_the_capital_of_france_matches(tmp_path):
  model, tokenizer = build('bert', tmp_path / 'hf')
  summary, restored = imported(tmp_path / 'hf', tmp_path / 'run')
  assert summary['task'] == 'mlm' and restored.config.model.mask_id == tokenizer.mask_token_id
  target = tokenizer('The capital of France is Paris.')['input_ids']
  masked = tokenizer('The capital of France is [MASK].')['input_ids']
  paris = tokenizer('Paris', add_special_tokens=False)['input_ids']
  assert len(paris) == 1 and len(masked) == len(target)
  labels = np.where(np.array(masked) == tokenizer.mask_token_id, target, -100)
  with torch.no_grad():
    expected = model(torch.tensor([masked]), labels=torch.tensor(labels[None])).loss.item()
  logits = lmjax_logits(restored, [masked])
  np.testing.assert_allclose(logits, hf_logits(model, [masked]), atol=1e-4)
  losses, _ = steps.token_losses(logits, np.array([target]))
  ours = float(np.asarray(losses)[0][labels >= 0].mean())
  assert ours == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize('kind', ['gpt2', 'llama', 'bert'])
def test_import_export_import_is_bitwise_and_transformers_loads_the_export(kind, tmp_path):
  model, tokenizer = build(kind, tmp_path / 'hf')
  _, first = imported(tmp_path / 'hf', tmp_path / 'run')
  exported = hf.export_model(str(tmp_path / 'run'), str(tmp_path / 'out'), log=lambda m: None)
  assert exported['architecture'] == kind
  _, second = imported(tmp_path / 'out', tmp_path / 'run2')
  flat = lambda tree: {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}
  a, b = flat(first.params), flat(second.params)
  assert a.keys() == b.keys()
  for path in a:
    np.testing.assert_array_equal(a[path], b[path], err_msg='/'.join(path))
  auto = transformers.AutoModelForMaskedLM if kind == 'bert' else transformers.AutoModelForCausalLM
  loaded = auto.from_pretrained(str(tmp_path / 'out')).eval()
  ids = text_batch(tokenizer, length=24)
  np.testing.assert_allclose(hf_logits(loaded, ids), hf_logits(model, ids), atol=1e-5)
  loaded_tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path / 'out'))
  assert loaded_tokenizer(TEXT[:200])['input_ids'] == tokenizer(TEXT[:200])['input_ids']


def test_unsupported_options_and_architectures_name_the_field(tmp_path):
  build('gpt2', tmp_path / 'hf')
  config_path = tmp_path / 'hf' / 'config.json'
  record = json.loads(config_path.read_text())
  config_path.write_text(json.dumps({**record, 'activation_function': 'relu'}))
  with pytest.raises(hf.HFError, match=r"config.json: activation_function='relu' is not supported"):
    imported(tmp_path / 'hf', tmp_path / 'run')
  config_path.write_text(json.dumps({**record, 'model_type': 't5'}))
  with pytest.raises(hf.HFError, match=r"model_type='t5' is not supported; lmjax reads gpt2"):
    imported(tmp_path / 'hf', tmp_path / 'run')
  config = config_lib.base_config()  # layernorm + rope: none of the architectures
  config.model.positions = 'rope'
  with pytest.raises(hf.HFError, match=r"model.positions='rope' \(needs 'learned'\)"):
    hf.architecture(config.model)
  config.model.norm = 'rmsnorm'
  config.model.mlp = 'swiglu'
  assert hf.architecture(config.model) == 'llama'


def run_config(imported_dir, corpus_dir, **overrides):
  """configs/finetune_hf.py on the imported run, with the tiny test data."""
  from conftest import REPO

  config = config_lib.load_config_file(f'{REPO}/configs/finetune_hf.py:{imported_dir}')
  data = tiny_config(corpus_dir).data
  config.data.name, config.data.files = data.name, data.files
  config.data.validation_files, config.data.seq_len = data.validation_files, 32
  config.train.batch_size, config.train.eval_batch_size = 32, 32
  config.train.final_eval_batches, config.sample.max_new_tokens = 8, 0
  config.compilation_cache_dir = ''
  for dotted, value in overrides.items():
    node = config
    *parents, leaf = dotted.split('.')
    for key in parents:
      node = node[key]
    node[leaf] = value
  return config


@pytest.mark.slow
def test_an_imported_model_evaluates_fine_tunes_with_lora_and_exports_merged(corpus_dir, tmp_path):
  from lmjax import metrics
  from lmjax import train

  model, tokenizer = build('gpt2', tmp_path / 'hf')
  base = tiny_config(corpus_dir, **{'data.seq_len': 32})
  hf.import_model(str(tmp_path / 'hf'), str(tmp_path / 'run'), base, log=lambda m: None)
  result = evaluate.evaluate_checkpoint(str(tmp_path / 'run'), max_batches=2, log=lambda m: None)
  assert np.isfinite(result['loss']) and result['tokens'] > 0
  # LoRA fine-tuning from the import, on the local corpus.
  config = run_config(
    tmp_path / 'run',
    corpus_dir,
    **{
      'init_from': str(tmp_path / 'run'),
      'finetune.mode': 'lora',
      'finetune.lora_rank': 8,
      # The random model's logits are near uniform (small embeddings behind a
      # norm): the tied embedding is adapted too, so that it can learn.
      'finetune.lora_targets': r'(qkv|out|up|down|embed)/(kernel|embedding)$',
      'optimizer.learning_rate': 5e-2,
      'optimizer.warmup_steps': 5,
      'train.num_steps': 60,
      'train.eval_every': 0,
      'checkpoint.every': 60,
    },
  )
  tuned = train.train_and_evaluate(config, str(tmp_path / 'lora'))
  assert tuned['loss'] < result['loss'] - 0.3  # it learned the corpus
  losses = [
    r['train/loss'] for r in metrics.read_metrics(str(tmp_path / 'lora')) if 'train/loss' in r
  ]
  assert losses[-1] < losses[0]
  # Exported merged: transformers gives the logits of lmjax's merged model.
  hf.export_model(str(tmp_path / 'lora'), str(tmp_path / 'out'), log=lambda m: None)
  merged = evaluate.restore_for_inference(str(tmp_path / 'lora'), log=lambda m: None)
  loaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / 'out')).eval()
  ids = text_batch(tokenizer, length=24)
  np.testing.assert_allclose(hf_logits(loaded, ids), lmjax_logits(merged, ids), atol=1e-4)
  assert np.abs(hf_logits(loaded, ids) - hf_logits(model, ids)).max() > 1e-2  # it changed
  # A classifier on top of the imported backbone (frozen): it trains.
  labelled = tmp_path / 'labelled.jsonl'
  lines = [line for line in TEXT.splitlines() if len(line) > 20][:200]
  labelled.write_text(
    ''.join(
      json.dumps({'text': line if i % 2 else line[::-1], 'label': i % 2}) + '\n'
      for i, line in enumerate(lines)
    )
  )
  classifier = run_config(
    tmp_path / 'run',
    corpus_dir,
    **{
      'task': 'classify',
      'init_from': str(tmp_path / 'run'),
      'finetune.mode': 'frozen',
      'data.files': str(labelled),
      'data.validation_files': '',
      'data.validation_fraction': 0.25,
      'optimizer.learning_rate': 3e-2,
      'optimizer.warmup_steps': 5,
      'train.num_steps': 40,
      'train.eval_every': 0,
      'checkpoint.every': 40,
    },
  )
  scores = train.train_and_evaluate(classifier, str(tmp_path / 'classifier'))
  assert scores['accuracy'] > 0.6


def test_a_sentencepiece_only_model_loads_its_tokenizer_model(tmp_path):
  """Llama 2's layout: tokenizer.model (SentencePiece) and no tokenizer.json."""
  model, _ = build('llama', tmp_path / 'hf')
  for name in ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json'):
    (tmp_path / 'hf' / name).unlink(missing_ok=True)
  spm = lmjax_tokenizers.SentencePieceTokenizer.train(TEXT.splitlines(), 360, 'bpe', 10**6)
  spm.save(str(tmp_path / 'hf' / 'tokenizer.model'))
  _, restored = imported(tmp_path / 'hf', tmp_path / 'run')
  assert restored.tokenizer.kind == 'sentencepiece'
  assert restored.tokenizer.fingerprint() == spm.fingerprint()
  ids = np.stack([spm.encode(TEXT[2000:2600])[:40], spm.encode(TEXT[5000:5600])[:40]])
  assert np.abs(lmjax_logits(restored, ids) - hf_logits(model, ids)).max() < 1e-4
