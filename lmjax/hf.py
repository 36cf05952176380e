"""Hugging Face checkpoints in and out: GPT-2, Llama / Mistral / Qwen2, BERT.

    python -m lmjax.hf import --hf_dir DIR --workdir W [--config CONFIG] [--config.*]
    python -m lmjax.hf export --workdir W [--step N] --hf_dir OUT

`import` reads a local model directory (config.json, the tokenizer, and the
weights as one model.safetensors or shards listed in
model.safetensors.index.json) and writes an ordinary lmjax run in W: CONFIG
(default: the base config) with model.*, tokenizer.* and the task set from
DIR, derived.json, the tokenizer, and an Orbax checkpoint at step 0 that holds
the parameters (no optimizer state). From there `lmjax.evaluate`,
`lmjax.sample` and `init_from=W` (full, frozen or LoRA fine-tuning, a
classifier on top) work as on any run. Tensors are read one at a time (a
pread each, from the safetensors format) and converted and placed as they
come, so the peak memory is about the model's float32 size plus one tensor.

`export` writes OUT/config.json, OUT/model.safetensors (float32, one tensor
converted and written at a time) and the
tokenizer's files (tokenizer.json and its special tokens, or a SentencePiece
tokenizer.model) for a step of a run (a LoRA run merged into its base), which
transformers' AutoModelForCausalLM / AutoModelForMaskedLM.from_pretrained(OUT)
loads.

Conventions: a torch Linear weight [out, in] is an lmjax kernel [in, out...]
(GPT-2's Conv1D weight is [in, out] already); the fused qkv kernel [embed, 3,
heads, head_dim] stacks the query, key and value projections (grouped-query
attention keeps a query kernel and a fused key/value one); SwiGLU's gate_up
kernel stacks gate and up; RoPE rotates the two halves of each head, which is
the layout of Hugging Face's Llama-family checkpoints.
"""

import dataclasses
import json
import os
import struct
import sys
import time
from collections.abc import Callable

import jax
import ml_dtypes
import numpy as np
from absl import app
from absl import flags
from flax import traverse_util

from lmjax import checkpoint
from lmjax import config as config_lib
from lmjax import derived as derived_lib
from lmjax import evaluate
from lmjax import fs
from lmjax import models
from lmjax import tasks
from lmjax import train_state
from lmjax import validation
from lmjax.data import tokenizers
from lmjax.models import transformer

ARCHITECTURES = ('gpt2', 'llama', 'mistral', 'qwen2', 'bert')
HF_CLASSES = {
  'gpt2': 'GPT2LMHeadModel',
  'llama': 'LlamaForCausalLM',
  'mistral': 'MistralForCausalLM',
  'qwen2': 'Qwen2ForCausalLM',
  'bert': 'BertForMaskedLM',
}
# Buffers some checkpoints carry that are not parameters.
_BUFFERS = ('.attn.bias', '.attn.masked_bias', 'rotary_emb.inv_freq', 'position_ids')


class HFError(ValueError):
  """A Hugging Face model directory lmjax cannot read, or a run it cannot write as one."""


# ----------------------------------------------------------------------------
# Tensor layouts.


@dataclasses.dataclass(frozen=True)
class Tensor:
  """One lmjax parameter and the Hugging Face tensor(s) it is made of."""

  path: tuple  # the lmjax parameter's path in params
  names: tuple  # the Hugging Face tensors, in the order to_lmjax takes them
  to_lmjax: Callable  # (*hf arrays) -> the lmjax array
  to_hf: Callable  # lmjax array -> tuple of hf arrays


def _same(path, name):
  return Tensor(path, (name,), lambda w: w, lambda k: (k,))


def _reshaped(path, name, shape):
  """A flat Hugging Face tensor (a bias) as an lmjax one of `shape`."""
  return Tensor(path, (name,), lambda w: w.reshape(shape), lambda k: (k.reshape(-1),))


def _linear(path, name, shape):
  """torch Linear [out, in] -> kernel [in, *shape]."""
  return Tensor(
    path,
    (name,),
    lambda w: w.T.reshape(w.shape[1], *shape),
    lambda k: (np.ascontiguousarray(k.reshape(k.shape[0], -1).T),),
  )


def _conv1d(path, name, shape):
  """GPT-2's Conv1D [in, out] -> kernel [in, *shape]."""
  return Tensor(
    path, (name,), lambda w: w.reshape(w.shape[0], *shape), lambda k: (k.reshape(k.shape[0], -1),)
  )


def _out(path, name, heads, head_dim, conv1d=False):
  """The attention output projection -> kernel [heads, head_dim, embed]."""
  if conv1d:  # [heads * head_dim, embed]
    return Tensor(
      path,
      (name,),
      lambda w: w.reshape(heads, head_dim, -1),
      lambda k: (k.reshape(heads * head_dim, -1),),
    )
  return Tensor(  # torch Linear [embed, heads * head_dim]
    path,
    (name,),
    lambda w: w.T.reshape(heads, head_dim, -1),
    lambda k: (np.ascontiguousarray(k.reshape(heads * head_dim, -1).T),),
  )


def _stacked_linear(path, names, shape):
  """len(names) torch Linears [out_i, in] -> kernel [in, len(names), *shape]."""
  return Tensor(
    path,
    tuple(names),
    lambda *ws: np.stack([w.T.reshape(w.shape[1], *shape) for w in ws], axis=1),
    lambda k: tuple(
      np.ascontiguousarray(k[:, i].reshape(k.shape[0], -1).T) for i in range(len(names))
    ),
  )


def _stacked_bias(path, names, shape):
  return Tensor(
    path,
    tuple(names),
    lambda *bs: np.stack([b.reshape(shape) for b in bs]),
    lambda k: tuple(k[i].reshape(-1) for i in range(len(names))),
  )


def _norm(path, prefix, kind, hf_names=('weight', 'bias')):
  module = 'LayerNorm_0' if kind == 'layernorm' else 'RMSNorm_0'
  tensors = [_same(path + (module, 'scale'), f'{prefix}.{hf_names[0]}')]
  if kind == 'layernorm':
    tensors.append(_same(path + (module, 'bias'), f'{prefix}.{hf_names[1]}'))
  return tensors


def tensors(arch: str, c: models.ModelConfig, prefix: str = '') -> list[Tensor]:
  """Every parameter of an lmjax model of `c` and its Hugging Face tensors
  (`prefix`: the base model's name in the checkpoint, e.g. 'transformer.')."""
  heads, kv_heads, head_dim = c.num_heads, c.kv_heads, c.attention_head_dim
  hidden, embed = c.mlp_hidden_dim, c.embed_dim
  if arch == 'gpt2':
    p = prefix
    result = [
      _same(('embed', 'embedding'), f'{p}wte.weight'),
      _same(('position_embed', 'embedding'), f'{p}wpe.weight'),
    ]
    for i in range(c.num_layers):
      b, h = (f'block_{i}',), f'{p}h.{i}'
      result += _norm(b + ('attention_norm',), f'{h}.ln_1', 'layernorm')
      result += [
        _conv1d(
          b + ('attention', 'qkv', 'kernel'), f'{h}.attn.c_attn.weight', (3, heads, head_dim)
        ),
        _reshaped(b + ('attention', 'qkv', 'bias'), f'{h}.attn.c_attn.bias', (3, heads, head_dim)),
        _out(b + ('attention', 'out', 'kernel'), f'{h}.attn.c_proj.weight', heads, head_dim, True),
        _same(b + ('attention', 'out', 'bias'), f'{h}.attn.c_proj.bias'),
      ]
      result += _norm(b + ('mlp_norm',), f'{h}.ln_2', 'layernorm')
      result += [
        _same(b + ('mlp', 'up', 'kernel'), f'{h}.mlp.c_fc.weight'),
        _same(b + ('mlp', 'up', 'bias'), f'{h}.mlp.c_fc.bias'),
        _same(b + ('mlp', 'down', 'kernel'), f'{h}.mlp.c_proj.weight'),
        _same(b + ('mlp', 'down', 'bias'), f'{h}.mlp.c_proj.bias'),
      ]
    return result + _norm(('final_norm',), f'{p}ln_f', 'layernorm')
  if arch in ('llama', 'mistral', 'qwen2'):
    p = prefix
    result = [_same(('embed', 'embedding'), f'{p}embed_tokens.weight')]
    for i in range(c.num_layers):
      b, h = (f'block_{i}',), f'{p}layers.{i}'
      a = f'{h}.self_attn'
      result += _norm(b + ('attention_norm',), f'{h}.input_layernorm', 'rmsnorm')
      qkv = [f'{a}.{x}_proj' for x in 'qkv']
      if kv_heads == heads:
        result.append(
          _stacked_linear(
            b + ('attention', 'qkv', 'kernel'), [f'{n}.weight' for n in qkv], (heads, head_dim)
          )
        )
        if c.qkv_bias:
          result.append(
            _stacked_bias(
              b + ('attention', 'qkv', 'bias'), [f'{n}.bias' for n in qkv], (heads, head_dim)
            )
          )
      else:
        attention = b + ('attention',)
        result += [
          _linear(attention + ('query', 'kernel'), f'{qkv[0]}.weight', (heads, head_dim)),
          _stacked_linear(
            attention + ('key_value', 'kernel'),
            [f'{n}.weight' for n in qkv[1:]],
            (kv_heads, head_dim),
          ),
        ]
        if c.qkv_bias:
          result += [
            _reshaped(attention + ('query', 'bias'), f'{qkv[0]}.bias', (heads, head_dim)),
            _stacked_bias(
              attention + ('key_value', 'bias'),
              [f'{n}.bias' for n in qkv[1:]],
              (kv_heads, head_dim),
            ),
          ]
      result.append(_out(b + ('attention', 'out', 'kernel'), f'{a}.o_proj.weight', heads, head_dim))
      result += _norm(b + ('mlp_norm',), f'{h}.post_attention_layernorm', 'rmsnorm')
      result += [
        _stacked_linear(
          b + ('mlp', 'gate_up', 'kernel'),
          [f'{h}.mlp.gate_proj.weight', f'{h}.mlp.up_proj.weight'],
          (hidden,),
        ),
        _linear(b + ('mlp', 'down', 'kernel'), f'{h}.mlp.down_proj.weight', (embed,)),
      ]
    result += _norm(('final_norm',), f'{p}norm', 'rmsnorm')
    if not c.tie_embeddings:
      result.append(_linear(('unembed', 'kernel'), 'lm_head.weight', (c.vocab_size,)))
    return result
  if arch == 'bert':
    p = prefix
    result = [
      _same(('embed', 'embedding'), f'{p}embeddings.word_embeddings.weight'),
      _same(('position_embed', 'embedding'), f'{p}embeddings.position_embeddings.weight'),
      _same(('type_embed',), f'{p}embeddings.token_type_embeddings.weight'),
    ]
    result += _norm(('embed_norm',), f'{p}embeddings.LayerNorm', 'layernorm')
    for i in range(c.num_layers):
      b, h = (f'block_{i}',), f'{p}encoder.layer.{i}'
      a = f'{h}.attention.self'
      qkv = [f'{a}.{x}' for x in ('query', 'key', 'value')]
      result += [
        _stacked_linear(
          b + ('attention', 'qkv', 'kernel'), [f'{n}.weight' for n in qkv], (heads, head_dim)
        ),
        _stacked_bias(
          b + ('attention', 'qkv', 'bias'), [f'{n}.bias' for n in qkv], (heads, head_dim)
        ),
        _out(
          b + ('attention', 'out', 'kernel'), f'{h}.attention.output.dense.weight', heads, head_dim
        ),
        _same(b + ('attention', 'out', 'bias'), f'{h}.attention.output.dense.bias'),
      ]
      result += _norm(b + ('attention_norm',), f'{h}.attention.output.LayerNorm', 'layernorm')
      result += [
        _linear(b + ('mlp', 'up', 'kernel'), f'{h}.intermediate.dense.weight', (hidden,)),
        _same(b + ('mlp', 'up', 'bias'), f'{h}.intermediate.dense.bias'),
        _linear(b + ('mlp', 'down', 'kernel'), f'{h}.output.dense.weight', (embed,)),
        _same(b + ('mlp', 'down', 'bias'), f'{h}.output.dense.bias'),
      ]
      result += _norm(b + ('mlp_norm',), f'{h}.output.LayerNorm', 'layernorm')
    result += [
      _linear(('head_transform', 'kernel'), 'cls.predictions.transform.dense.weight', (embed,)),
      _same(('head_transform', 'bias'), 'cls.predictions.transform.dense.bias'),
    ]
    result += _norm(('head_norm',), 'cls.predictions.transform.LayerNorm', 'layernorm')
    return result + [_same(('output_bias',), 'cls.predictions.bias')]
  raise HFError(f'unknown architecture {arch!r}; lmjax reads {", ".join(ARCHITECTURES)}')


# ----------------------------------------------------------------------------
# Configs: Hugging Face config.json <-> lmjax model settings.


def _unsupported(where: str, field: str, value, why: str) -> HFError:
  return HFError(f'{where}: {field}={value!r} is not supported ({why})')


def _rope(hf: dict, where: str) -> tuple[float, dict]:
  """(theta, lmjax rope_scaling settings) from the legacy rope_theta /
  rope_scaling fields or transformers 5's rope_parameters."""
  parameters = dict(hf.get('rope_parameters') or {})
  scaling = dict(hf.get('rope_scaling') or parameters)
  theta = float(parameters.get('rope_theta', hf.get('rope_theta', 10_000.0)))
  kind = scaling.get('rope_type', scaling.get('type', 'default'))
  if kind in ('default', None):
    return theta, {'kind': ''}
  if kind != 'llama3':
    raise _unsupported(where, 'rope_scaling.rope_type', kind, "lmjax has 'llama3' and none")
  return theta, {
    'kind': 'llama3',
    'factor': float(scaling['factor']),
    'low_freq_factor': float(scaling['low_freq_factor']),
    'high_freq_factor': float(scaling['high_freq_factor']),
    'original_max_len': int(scaling['original_max_position_embeddings']),
  }


def model_settings(hf: dict, where: str, seq_len: int) -> tuple[str, str, dict]:
  """(architecture, task, {model.* setting: value}) of a Hugging Face config;
  an option lmjax does not implement is an HFError naming the field."""
  model_type = hf.get('model_type')
  if model_type == 'gpt2':
    activation = hf.get('activation_function', 'gelu_new')
    mlps = {'gelu_new': 'gelu', 'gelu_pytorch_tanh': 'gelu', 'gelu': 'gelu_exact'}
    if activation not in mlps:
      raise _unsupported(where, 'activation_function', activation, f'lmjax has {list(mlps)}')
    for field in ('scale_attn_by_inverse_layer_idx', 'add_cross_attention'):
      if hf.get(field):
        raise _unsupported(where, field, hf[field], 'lmjax has neither')
    return (
      'gpt2',
      'lm',
      {
        'family': 'transformer',
        'num_layers': hf['n_layer'],
        'num_heads': hf['n_head'],
        'embed_dim': hf['n_embd'],
        'mlp_dim': hf.get('n_inner') or 4 * hf['n_embd'],
        'mlp': mlps[activation],
        'positions': 'learned',
        'norm': 'layernorm',
        'norm_eps': float(hf.get('layer_norm_epsilon', 1e-5)),
        'bias': True,
        'tie_embeddings': True,
        'max_len': hf['n_positions'],
        'vocab_size': hf['vocab_size'],
      },
    )
  if model_type in ('llama', 'mistral', 'qwen2'):
    if hf.get('hidden_act', 'silu') != 'silu':
      raise _unsupported(where, 'hidden_act', hf['hidden_act'], "lmjax's SwiGLU gates with silu")
    if hf.get('mlp_bias'):
      raise _unsupported(where, 'mlp_bias', True, 'lmjax has no MLP biases with SwiGLU')
    if model_type == 'llama' and hf.get('attention_bias'):
      raise _unsupported(where, 'attention_bias', True, 'lmjax has query/key/value biases only')
    window = hf.get('sliding_window') if hf.get('use_sliding_window', True) else None
    if window and window < seq_len:
      raise _unsupported(
        where, 'sliding_window', window, f'lmjax attends over the whole data.seq_len={seq_len}'
      )
    theta, scaling = _rope(hf, where)
    heads = hf['num_attention_heads']
    return (
      model_type,
      'lm',
      {
        'family': 'transformer',
        'num_layers': hf['num_hidden_layers'],
        'num_heads': heads,
        'num_kv_heads': hf.get('num_key_value_heads') or heads,
        'embed_dim': hf['hidden_size'],
        'head_dim': hf.get('head_dim') or hf['hidden_size'] // heads,
        'mlp_dim': hf['intermediate_size'],
        'mlp': 'swiglu',
        'positions': 'rope',
        'rope_theta': theta,
        'rope_scaling': scaling,
        'norm': 'rmsnorm',
        'norm_eps': float(hf.get('rms_norm_eps', 1e-6)),
        'qkv_bias': model_type == 'qwen2',
        'tie_embeddings': bool(hf.get('tie_word_embeddings', False)),
        'vocab_size': hf['vocab_size'],
      },
    )
  if model_type == 'bert':
    if hf.get('position_embedding_type', 'absolute') != 'absolute':
      raise _unsupported(
        where, 'position_embedding_type', hf['position_embedding_type'], "lmjax has 'absolute'"
      )
    mlps = {'gelu': 'gelu_exact', 'gelu_new': 'gelu'}
    if hf.get('hidden_act', 'gelu') not in mlps:
      raise _unsupported(where, 'hidden_act', hf['hidden_act'], f'lmjax has {list(mlps)}')
    return (
      'bert',
      'mlm',
      {
        'family': 'encoder',
        'block': 'post_norm',
        'num_layers': hf['num_hidden_layers'],
        'num_heads': hf['num_attention_heads'],
        'embed_dim': hf['hidden_size'],
        'mlp_dim': hf['intermediate_size'],
        'mlp': mlps[hf.get('hidden_act', 'gelu')],
        'positions': 'learned',
        'norm': 'layernorm',
        'norm_eps': float(hf.get('layer_norm_eps', 1e-12)),
        'bias': True,
        'tie_embeddings': True,
        'type_vocab_size': hf.get('type_vocab_size', 2),
        'head_transform': True,
        'output_bias': True,
        'max_len': hf['max_position_embeddings'],
        'vocab_size': hf['vocab_size'],
      },
    )
  raise HFError(
    f'{where}: model_type={model_type!r} is not supported; lmjax reads {", ".join(ARCHITECTURES)}'
  )


# What each architecture needs of an lmjax model config, to be written as one.
_REQUIRES = {
  'gpt2': {
    'family': 'transformer',
    'block': 'pre_norm',
    'positions': 'learned',
    'norm': 'layernorm',
    'mlp': ('gelu', 'gelu_exact'),
    'tie_embeddings': True,
    'num_kv_heads': (0, None),
    'qkv_bias': False,
    'head_transform': False,
    'output_bias': False,
    'type_vocab_size': 0,
  },
  'llama': {
    'family': 'transformer',
    'block': 'pre_norm',
    'positions': 'rope',
    'norm': 'rmsnorm',
    'mlp': 'swiglu',
    'bias': False,
    'head_transform': False,
    'output_bias': False,
    'type_vocab_size': 0,
  },
  'bert': {
    'family': 'encoder',
    'block': 'post_norm',
    'positions': 'learned',
    'norm': 'layernorm',
    'mlp': ('gelu', 'gelu_exact'),
    'tie_embeddings': True,
    'num_kv_heads': (0, None),
    'head_transform': True,
    'output_bias': True,
    'qkv_bias': False,
  },
}


def architecture(model_config) -> str:
  """The Hugging Face architecture an lmjax model config is, or an HFError
  naming the settings that keep it from the nearest one."""
  misses = {}
  for arch, needs in _REQUIRES.items():
    wrong = []
    for field, wanted in needs.items():
      value = model_config[field]
      allowed = wanted if isinstance(wanted, tuple) else (wanted,)
      if field == 'num_kv_heads':
        allowed = (0, model_config.num_heads)
      if value not in allowed:
        wrong.append(f'model.{field}={value!r} (needs {" or ".join(map(repr, allowed))})')
    if not wrong:
      return 'qwen2' if arch == 'llama' and model_config.qkv_bias else arch
    misses[arch] = wrong
  nearest = min(misses, key=lambda arch: len(misses[arch]))
  raise HFError(
    f'this model is none of {", ".join(_REQUIRES)}; nearest {nearest}, which needs: '
    + '; '.join(misses[nearest])
  )


def hf_config(arch: str, c: models.ModelConfig, tokenizer) -> dict:
  """The config.json of an lmjax model (`c`, resolved) as architecture `arch`."""
  specials = getattr(tokenizer, 'specials', {})
  eos = int(tokenizer.eos_id)
  common = {
    'architectures': [HF_CLASSES[arch]],
    'model_type': arch,
    'vocab_size': c.vocab_size,
    'torch_dtype': 'float32',
  }
  if arch == 'gpt2':
    return {
      **common,
      'n_layer': c.num_layers,
      'n_head': c.num_heads,
      'n_embd': c.embed_dim,
      'n_inner': c.mlp_hidden_dim,
      'n_positions': c.max_len,
      'activation_function': 'gelu_new' if c.mlp == 'gelu' else 'gelu',
      'layer_norm_epsilon': c.norm_eps or 1e-5,
      'resid_pdrop': 0.0,
      'embd_pdrop': 0.0,
      'attn_pdrop': 0.0,
      'bos_token_id': specials.get('bos', eos),
      'eos_token_id': eos,
      'tie_word_embeddings': True,
    }
  if arch in ('llama', 'mistral', 'qwen2'):
    record = {
      **common,
      'num_hidden_layers': c.num_layers,
      'num_attention_heads': c.num_heads,
      'num_key_value_heads': c.kv_heads,
      'hidden_size': c.embed_dim,
      'head_dim': c.attention_head_dim,
      'intermediate_size': c.mlp_hidden_dim,
      'hidden_act': 'silu',
      'max_position_embeddings': c.max_len,
      'rms_norm_eps': c.norm_eps or 1e-6,
      'rope_theta': c.rope_theta,
      'rope_scaling': None,
      'tie_word_embeddings': c.tie_embeddings,
      'attention_bias': False,
      'mlp_bias': False,
      'bos_token_id': specials.get('bos', eos),
      'eos_token_id': eos,
    }
    if c.rope_scaling:
      _, factor, low, high, original = c.rope_scaling
      record['rope_scaling'] = {
        'rope_type': 'llama3',
        'factor': factor,
        'low_freq_factor': low,
        'high_freq_factor': high,
        'original_max_position_embeddings': original,
      }
    if arch == 'qwen2':
      record.update(use_sliding_window=False, sliding_window=None)
    return record
  return {
    **common,
    'num_hidden_layers': c.num_layers,
    'num_attention_heads': c.num_heads,
    'hidden_size': c.embed_dim,
    'intermediate_size': c.mlp_hidden_dim,
    'hidden_act': 'gelu' if c.mlp == 'gelu_exact' else 'gelu_new',
    'max_position_embeddings': c.max_len,
    'type_vocab_size': c.type_vocab_size,
    'layer_norm_eps': c.norm_eps or 1e-5,
    'hidden_dropout_prob': 0.0,
    'attention_probs_dropout_prob': 0.0,
    'pad_token_id': specials.get('pad', 0),
  }


# ----------------------------------------------------------------------------
# Reading and writing weights.


# The safetensors format (https://github.com/huggingface/safetensors): an 8-byte
# little-endian header length, a JSON header {name: {dtype, shape, data_offsets}},
# then the tensors' bytes. lmjax reads and writes it directly, a tensor at a
# time with pread / write: safe_open's memory map counts every page read in the
# process' RSS (a GPT-2 124M import peaked at 2.2 GB through it), and
# safetensors' save_file serialises the whole model into one buffer first.
_DTYPES = {
  'F64': np.dtype('<f8'),
  'F32': np.dtype('<f4'),
  'F16': np.dtype('<f2'),
  'BF16': np.dtype(ml_dtypes.bfloat16),
}


class SafetensorsFile:
  """One .safetensors file: its tensors' names, and `get(name)` reading one."""

  def __init__(self, path: str):
    self.path = path
    try:
      with open(path, 'rb') as f:
        (length,) = struct.unpack('<Q', f.read(8))
        self.header = json.loads(f.read(length))
    except (struct.error, ValueError, UnicodeDecodeError) as error:
      raise HFError(f'{path} is not a safetensors file ({error})') from None
    self.header.pop('__metadata__', None)
    self.start = 8 + length
    self.fd = os.open(path, os.O_RDONLY)

  def keys(self) -> list[str]:
    return list(self.header)

  def get(self, name: str) -> np.ndarray:
    info = self.header[name]
    if info['dtype'] not in _DTYPES:
      raise HFError(f'{self.path}: tensor {name} is {info["dtype"]}; lmjax reads {list(_DTYPES)}')
    begin, end = info['data_offsets']
    data = os.pread(self.fd, end - begin, self.start + begin)
    if len(data) != end - begin:
      raise HFError(f'{self.path} is truncated: tensor {name} ends past the end of the file')
    return np.frombuffer(data, _DTYPES[info['dtype']]).reshape(info['shape'])


def write_safetensors(path: str, tensors: list, metadata: dict | None = None) -> None:
  """Writes (name, shape, produce) float32 tensors, calling produce() for one
  tensor at a time (so only one is in memory), under a temporary name."""
  header, offset = {}, 0
  for name, shape, _ in tensors:
    size = 4 * int(np.prod(shape))
    header[name] = {'dtype': 'F32', 'shape': list(shape), 'data_offsets': [offset, offset + size]}
    offset += size
  if metadata:
    header['__metadata__'] = metadata
  encoded = json.dumps(header, separators=(',', ':')).encode()
  encoded += b' ' * (-len(encoded) % 8)  # the data starts 8-byte aligned
  temporary = f'{path}.tmp-{os.getpid()}'
  with open(temporary, 'wb') as f:
    f.write(struct.pack('<Q', len(encoded)) + encoded)
    for name, shape, produce in tensors:
      value = np.ascontiguousarray(produce(), '<f4')
      if value.shape != tuple(shape):
        raise HFError(f'tensor {name}: shape {value.shape}, expected {tuple(shape)}')
      f.write(value.tobytes())
  os.replace(temporary, path)


class _Weights:
  """A model directory's safetensors (one file, or the shards its index lists):
  get(name) reads one tensor, as float32."""

  def __init__(self, hf_dir: str):
    index_path = os.path.join(hf_dir, 'model.safetensors.index.json')
    single = os.path.join(hf_dir, 'model.safetensors')
    if os.path.exists(index_path):
      with open(index_path) as f:
        files = sorted(set(json.load(f)['weight_map'].values()))
    elif os.path.exists(single):
      files = ['model.safetensors']
    else:
      raise HFError(
        f'{hf_dir} has no model.safetensors or model.safetensors.index.json (lmjax reads '
        'safetensors; convert a pytorch_model.bin with transformers save_pretrained first)'
      )
    self.hf_dir, self.files, self.where = hf_dir, {}, {}
    for name in files:
      path = os.path.join(hf_dir, name)
      if not os.path.exists(path):
        raise HFError(f'{path} is missing (listed in model.safetensors.index.json)')
      self.files[name] = SafetensorsFile(path)
      for key in self.files[name].keys():
        self.where[key] = name

  def get(self, name: str) -> np.ndarray:
    return np.asarray(self.files[self.where[name]].get(name), np.float32)


_PREFIXES = {
  'gpt2': ('transformer.', ''),
  'llama': ('model.', ''),
  'mistral': ('model.', ''),
  'qwen2': ('model.', ''),
  'bert': ('bert.', ''),
}


def _model_prefix(arch: str, weights: _Weights) -> str:
  probe = {
    'gpt2': 'wte.weight',
    'bert': 'embeddings.word_embeddings.weight',
  }.get(arch, 'embed_tokens.weight')
  for prefix in _PREFIXES[arch]:
    if prefix + probe in weights.where:
      return prefix
  raise HFError(f'{weights.hf_dir}: no {probe} under any of {_PREFIXES[arch]}: not a {arch} model')


def _log(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def import_model(hf_dir: str, workdir: str, base_config=None, log=_log) -> dict:
  """Writes the Hugging Face model in `hf_dir` as an lmjax run in `workdir`
  (see the module docstring); returns a summary."""
  started = time.perf_counter()
  where = os.path.join(hf_dir, 'config.json')
  if not os.path.exists(where):
    raise HFError(f'{where} is missing: --hf_dir must be a Hugging Face model directory')
  with open(where) as f:
    hf = json.load(f)
  config = base_config if base_config is not None else config_lib.base_config()
  arch, task, settings = model_settings(hf, where, config.data.seq_len)
  config.task = task
  for key, value in settings.items():
    if key == 'rope_scaling':
      for field, v in value.items():
        config.model.rope_scaling[field] = v
    else:
      config.model[key] = value
  tokenizer = _import_tokenizer(hf_dir, config)
  if task == 'mlm':
    mask = tokenizer.specials.get('mask') if hasattr(tokenizer, 'specials') else None
    if mask is None:
      raise HFError(f'{hf_dir}: the tokenizer names no mask_token, which masked-LM needs')
    config.model.mask_id = int(mask)
  if tokenizer.vocab_size > config.model.vocab_size:
    raise HFError(
      f'{hf_dir}: the tokenizer has {tokenizer.vocab_size} tokens but the model only '
      f'{config.model.vocab_size} embedding rows (config.json vocab_size)'
    )
  validation.check(config)
  record = derived_lib.Derived(
    vocab_size=tokenizer.vocab_size,
    steps_per_epoch=1,
    num_steps=derived_lib.num_steps(config, 1),
  )
  model = tasks.get(config.task).build_model(config, record)
  abstract, _ = train_state.params_and_specs(model, config.data.seq_len)
  layers = model.config.num_layers
  wanted = {path: leaf.shape for path, leaf in traverse_util.flatten_dict(abstract).items()}
  if model.config.scan_layers:  # tensors() names the loop's blocks: one layer each
    wanted = transformer.unstack_layers(wanted, layers, take=lambda shape, _: shape[1:])
  weights = _Weights(hf_dir)
  prefix = _model_prefix(arch, weights)
  flat, used = {}, set()
  for tensor in tensors(arch, model.config, prefix):
    names = tensor.names
    missing = [n for n in names if n not in weights.where]
    if missing:
      raise HFError(f'{hf_dir}: tensor {missing[0]} is missing (needed for {arch})')
    value = tensor.to_lmjax(*(weights.get(n) for n in names))
    if tuple(value.shape) != tuple(wanted[tensor.path]):
      raise HFError(
        f'{hf_dir}: tensor {", ".join(names)} gives lmjax {"/".join(tensor.path)} the shape '
        f'{tuple(value.shape)}, but its config.json makes it {tuple(wanted[tensor.path])}'
      )
    flat[tensor.path] = value.astype(model.config.param_dtype)
    used.update(names)
  unmapped = set(wanted) - set(flat)
  if unmapped:
    raise HFError(f'no Hugging Face tensor maps onto {sorted("/".join(p) for p in unmapped)[:5]}')
  ignored = sorted(n for n in weights.where if n not in used and not n.endswith(_BUFFERS))
  if ignored:
    log(f'hf import: {len(ignored)} tensor(s) not used by lmjax: {", ".join(ignored[:6])}')
  # The tokenizer travels in the run (and every checkpoint), so the config does
  # not point at the import machine's files: a pod's hosts need not have them.
  config.tokenizer.model_file = ''
  fs.makedirs(workdir)
  tokenizers.for_run(config.tokenizer, workdir, None, tokenizer)
  record.save(workdir)
  config_lib.save(config, workdir)
  manager = checkpoint.manager(workdir)
  if model.config.scan_layers:
    flat = transformer.stack_layers(flat, layers)
  params = traverse_util.unflatten_dict({p: jax.device_put(v) for p, v in flat.items()})
  del flat
  state = {'step': jax.numpy.zeros((), jax.numpy.int32), 'params': params}
  config_json = json.loads(config_lib.to_json(config))
  checkpoint.save(manager, 0, state, config_json, record, tokenizer.to_json())
  manager.wait_until_finished()
  manager.close()
  count = sum(int(np.prod(s)) for s in wanted.values())
  summary = {
    'architecture': arch,
    'task': task,
    'parameters': count,
    'workdir': workdir,
    'seconds': round(time.perf_counter() - started, 2),
  }
  log(
    f'hf import: {arch} with {count:,} parameters from {hf_dir} -> {workdir} '
    f'(checkpoint step 0; init_from={workdir} fine-tunes it)'
  )
  return summary


def _import_tokenizer(hf_dir: str, config):
  """The directory's tokenizer: tokenizer.json, else a SentencePiece tokenizer.model."""
  if os.path.exists(os.path.join(hf_dir, 'tokenizer.json')):
    config.tokenizer.kind = 'huggingface'
    config.tokenizer.model_file = hf_dir
    return tokenizers.HuggingFaceTokenizer.load(hf_dir)
  model_file = os.path.join(hf_dir, 'tokenizer.model')
  if os.path.exists(model_file):
    config.tokenizer.kind = 'sentencepiece'
    config.tokenizer.model_file = model_file
    return tokenizers.SentencePieceTokenizer.load(model_file)
  raise HFError(f'{hf_dir} has no tokenizer.json or tokenizer.model')


def export_model(workdir: str, hf_dir: str, step: str = 'latest', log=_log) -> dict:
  """Writes step `step` of the run in `workdir` as a Hugging Face model directory."""
  started = time.perf_counter()
  restored = evaluate.restore_for_inference(workdir, step, log)
  config, tokenizer = restored.config, restored.tokenizer
  if restored.derived.num_classes:
    raise HFError(
      f'{workdir} is a classifier (task=classify); lmjax exports language models '
      '(GPT-2, Llama, Qwen2, BERT masked-LM)'
    )
  arch = architecture(config.model)
  c = restored.model.config
  params = {
    path: np.asarray(jax.device_get(v))
    for path, v in traverse_util.flatten_dict(restored.params).items()
  }
  if c.scan_layers:  # tensors() names the loop's blocks: one layer each (views)
    params = transformer.unstack_layers(params, c.num_layers)
  # A model without biases is the architecture with zero biases (GPT-2, BERT).
  with_bias = config_lib.from_json(config_lib.to_json(config))
  with_bias.model.bias = arch in ('gpt2', 'bert')
  full = tasks.get(config.task).build_model(with_bias, restored.derived)
  abstract = train_state.params_and_specs(full, config.data.seq_len)[0]
  abstract = {path: leaf.shape for path, leaf in traverse_util.flatten_dict(abstract).items()}
  if c.scan_layers:
    abstract = transformer.unstack_layers(abstract, c.num_layers, lambda shape, _: shape[1:])
  for path, shape in abstract.items():
    if path not in params and path[-1] == 'bias':
      params[path] = np.zeros(shape, np.float32)
  converted = {}  # the tensor being written: its Hugging Face parts, converted once

  def part(tensor, i):
    if converted.get('path') != tensor.path:
      parts = tensor.to_hf(np.asarray(params[tensor.path], np.float32))
      converted.update(path=tensor.path, parts=parts)
    return converted['parts'][i]

  planned = []  # (name, shape, produce): written in order, a tensor's parts together
  for tensor in tensors(arch, c, _PREFIXES[arch][0]):
    if tensor.path not in params:
      raise HFError(f'{workdir}: parameter {"/".join(tensor.path)} is missing for {arch}')
    value = params[tensor.path]
    shapes = [p.shape for p in tensor.to_hf(np.zeros(value.shape, np.float32))]
    for i, (name, shape) in enumerate(zip(tensor.names, shapes)):
      planned.append((name, shape, lambda t=tensor, i=i: part(t, i)))
  os.makedirs(hf_dir, exist_ok=True)
  write_safetensors(os.path.join(hf_dir, 'model.safetensors'), planned, {'format': 'pt'})
  with open(os.path.join(hf_dir, 'config.json'), 'w') as f:
    json.dump(hf_config(arch, c, tokenizer), f, indent=2)
  written = _export_tokenizer(tokenizer, hf_dir, arch)
  summary = {
    'architecture': arch,
    'step': restored.step,
    'hf_dir': hf_dir,
    'tensors': len(planned),
    'tokenizer_files': written,
    'seconds': round(time.perf_counter() - started, 2),
  }
  log(f'hf export: step {restored.step} of {workdir} as {arch} -> {hf_dir}')
  return summary


def _export_tokenizer(tokenizer, hf_dir: str, arch: str) -> list[str]:
  if tokenizer.kind == 'huggingface':
    with open(os.path.join(hf_dir, 'tokenizer.json'), 'w') as f:
      f.write(tokenizer.tokenizer_json)
    vocabulary = tokenizer.tokenizer
    record = {'tokenizer_class': 'PreTrainedTokenizerFast'}
    for kind, token_id in tokenizer.specials.items():
      record[f'{kind}_token'] = vocabulary.id_to_token(int(token_id))
    with open(os.path.join(hf_dir, 'tokenizer_config.json'), 'w') as f:
      json.dump(record, f, indent=2)
    return ['tokenizer.json', 'tokenizer_config.json']
  if tokenizer.kind == 'sentencepiece':
    tokenizer.save(os.path.join(hf_dir, 'tokenizer.model'))
    return ['tokenizer.model']
  return []  # bytes, chars, words: no Hugging Face tokenizer file (the ids are lmjax's)


def _main(argv):
  values = flags.FLAGS
  if len(argv) != 2 or argv[1] not in ('import', 'export'):
    sys.exit('usage: python -m lmjax.hf import|export --hf_dir DIR --workdir W [...]')
  try:
    if argv[1] == 'import':
      config = values.config if values.config is not None else None
      summary = import_model(values.hf_dir, values.workdir, config)
    else:
      summary = export_model(values.workdir, values.hf_dir, values.step)
  except (HFError, config_lib.ConfigError, tokenizers.TokenizerError, OSError) as error:
    sys.exit(f'error: {error}')
  print(json.dumps(summary, indent=2))


def run():
  config_lib.define_config_flag()  # import: the data and training settings the run keeps
  flags.DEFINE_string('hf_dir', None, 'The Hugging Face model directory (read or written).')
  flags.DEFINE_string('workdir', None, 'The lmjax run (written or read).')
  flags.DEFINE_string('step', 'latest', "export: the step ('latest', 'best' or a number).")
  flags.mark_flags_as_required(['hf_dir', 'workdir'])
  app.run(_main)


if __name__ == '__main__':
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  run()
