"""Generation: KV-cache decoding equals recomputation, prompts of different lengths,
top-k / top-p, end tokens, determinism, recurrent models."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax import config as config_lib
from lmjax import models
from lmjax import sample
from lmjax.data import tokenizers

VOCAB, CONTEXT = 50, 24


def random_model(family='transformer', scale=20.0, **fields):
  """A random model whose greedy choices vary (parameters scaled up from init)."""
  c = config_lib.base_config().model
  c.family, c.num_layers, c.num_heads, c.embed_dim = family, 2, 2, 32
  for key, value in fields.items():
    c[key] = value
  model = models.build_model(c, VOCAB, CONTEXT)
  params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, CONTEXT), jnp.int32))['params'])
  return model, jax.tree.map(lambda x: x * scale, params)


PROMPT = np.array([3, 7, 9, 1, 4], np.int32)


@pytest.mark.parametrize('positions', ['rope', 'learned'])
def test_greedy_with_the_cache_equals_full_recomputation(positions):
  model, params = random_model(positions=positions)
  greedy = dict(vocab_size=VOCAB, temperature=0.0)
  cached = sample.generate(params, model, PROMPT, CONTEXT - len(PROMPT), **greedy)
  recomputed = sample.generate(
    params, model, PROMPT, CONTEXT - len(PROMPT), use_cache=False, **greedy
  )
  np.testing.assert_array_equal(cached, recomputed)
  assert len(set(cached[0].tolist())) > 3  # not a degenerate repetition


def test_sampling_with_the_cache_equals_recomputation_for_a_seed():
  model, params = random_model(scale=5.0)
  kwargs = dict(vocab_size=VOCAB, temperature=1.0, top_k=10, top_p=0.9, seed=3, num_samples=4)
  cached = sample.generate(params, model, PROMPT, 12, **kwargs)
  np.testing.assert_array_equal(cached, sample.generate(params, model, PROMPT, 12, **kwargs))
  np.testing.assert_array_equal(
    cached, sample.generate(params, model, PROMPT, 12, use_cache=False, **kwargs)
  )
  assert len({tuple(row) for row in cached}) > 1  # rows draw independently
  other = sample.generate(params, model, PROMPT, 12, **{**kwargs, 'seed': 4})
  assert not np.array_equal(cached, other)


def test_rope_decodes_past_the_context_with_a_ring_buffer():
  model, params = random_model(positions='rope')
  out = sample.generate(params, model, PROMPT, 3 * CONTEXT, vocab_size=VOCAB, temperature=0.0)
  assert out.shape == (1, 3 * CONTEXT)
  learned, learned_params = random_model(positions='learned')
  # Learned positions cannot go past the context: the reference (recompute) path is used.
  longer = sample.generate(
    learned_params, learned, PROMPT, CONTEXT, vocab_size=VOCAB, temperature=0.0
  )
  assert longer.shape == (1, CONTEXT)


@pytest.mark.parametrize('family', ['transformer', 'lstm'])
def test_prompts_of_different_lengths_decode_like_each_alone(family):
  model, params = random_model(family, scale=5.0 if family == 'lstm' else 20.0)
  prompts = [PROMPT, PROMPT[:2], np.array([11], np.int32)]
  together = sample.generate(params, model, prompts, 8, vocab_size=VOCAB, temperature=0.0)
  for prompt, row in zip(prompts, together):
    alone = sample.generate(params, model, prompt, 8, vocab_size=VOCAB, temperature=0.0)
    np.testing.assert_array_equal(row, alone[0])


@pytest.mark.parametrize('use_cache', [pytest.param(True, marks=pytest.mark.slow), False])
def test_prompts_of_different_lengths_decode_past_a_learned_context(use_cache):
  # Prompt + new tokens exceed the learned positions' context, so generation
  # recomputes over the last CONTEXT tokens (as `lmjax.sample` does for
  # --max_new_tokens past the context); a batch of prompts of any lengths
  # decodes as each prompt alone.
  model, params = random_model(positions='learned')
  prompts = [PROMPT, PROMPT[:2], np.array([11, 3, 5, 8, 2, 6, 30, 12], np.int32)]
  new_tokens = 2 * CONTEXT
  together = sample.generate(
    params, model, prompts, new_tokens, vocab_size=VOCAB, temperature=0.0, use_cache=use_cache
  )
  assert together.shape == (3, new_tokens)
  for prompt, row in zip(prompts, together):
    alone = sample.generate(
      params, model, prompt, new_tokens, vocab_size=VOCAB, temperature=0.0, use_cache=False
    )
    np.testing.assert_array_equal(row, alone[0])
  # Within the context, the recomputation agrees with the key/value cache.
  short = sample.generate(
    params, model, prompts, 8, vocab_size=VOCAB, temperature=0.0, use_cache=False
  )
  np.testing.assert_array_equal(
    short, sample.generate(params, model, prompts, 8, vocab_size=VOCAB, temperature=0.0)
  )


def test_recurrent_greedy_decoding_matches_reading_the_whole_sequence():
  model, params = random_model('gru', scale=5.0)
  out = sample.generate(params, model, PROMPT, 6, vocab_size=VOCAB, temperature=0.0)[0]
  sequence = np.concatenate([PROMPT, out])
  logits, _ = model.apply({'params': params}, jnp.asarray(sequence[None, :-1]))
  np.testing.assert_array_equal(np.argmax(logits[0, len(PROMPT) - 1 :], -1), out)


def test_generation_stops_at_the_end_token():
  model, params = random_model()
  free = sample.generate(params, model, PROMPT, 10, vocab_size=VOCAB, temperature=0.0)[0]
  eos = int(free[2])
  stopped = sample.generate(
    params, model, PROMPT, 10, vocab_size=VOCAB, temperature=0.0, eos_id=eos
  )[0]
  first = list(free).index(eos)  # <= 2; past it, the rest is unspecified
  np.testing.assert_array_equal(stopped[: first + 1], free[: first + 1])
  assert list(stopped).index(eos) == first <= 2


def test_top_k_and_top_p_keep_the_most_likely_tokens():
  logits = jnp.log(jnp.asarray([[0.5, 0.25, 0.15, 0.1]]))
  kept = lambda **kw: np.isfinite(
    np.asarray(sample.filter_logits(logits, 1.0, vocab_size=4, **kw))
  )[0].tolist()
  assert kept(top_k=0) == [True] * 4
  assert kept(top_k=2) == [True, True, False, False]
  assert kept(top_k=0, top_p=0.5) == [True, False, False, False]
  assert kept(top_k=0, top_p=0.7) == [True, True, False, False]
  assert kept(top_k=0, top_p=0.8) == [True, True, True, False]


def test_prompts_empty_or_outside_the_vocabulary():
  tokenizer = tokenizers.CharTokenizer.build(['abc\n'])
  np.testing.assert_array_equal(sample.encode_prompt(tokenizer, ''), [tokenizer.eos_id])
  with pytest.raises(ValueError, match=r"outside the vocabulary: \['z'\]"):
    sample.encode_prompt(tokenizer, 'abz')
  with pytest.raises(ValueError, match='non-empty prompt'):
    sample.generate({}, None, np.zeros(0, np.int32), 3, vocab_size=4)
