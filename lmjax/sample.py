"""Text generation from a trained model, and the `lmjax.sample` command.

    python -m lmjax.sample --workdir DIR --prompt "def " [--step N]

Generation runs as one jitted loop over a fixed-size token buffer, so it
compiles once whatever the number of tokens. For a Transformer, each new token
recomputes the model over the last `max_len` tokens (a KV cache comes with the
evaluation issue); a recurrent model reads the prompt once and then steps its
carried state one token at a time.
"""
import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from lmjax.data import cleaning


def _filter_logits(logits, temperature: float, top_k: int, vocab_size: int):
  """Masks padded vocabulary entries and all but the top-k, then scales."""
  logits = logits.astype(jnp.float32)
  logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_size, logits, -jnp.inf)
  if top_k > 0:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return logits / max(temperature, 1e-6)


@functools.partial(jax.jit, static_argnames=('model', 'prompt_len', 'total_len', 'temperature',
                                             'top_k', 'vocab_size'))
def _generate(params, buffer, rng, *, model, prompt_len, total_len, temperature, top_k,
              vocab_size):
  window = min(model.max_len, total_len)

  def body(position, buffer):
    start = jnp.maximum(position - window, 0)
    context = jax.lax.dynamic_slice_in_dim(buffer, start, window, axis=1)  # [batch, window]
    logits = model.apply({'params': params}, context, deterministic=True)
    last = jax.lax.dynamic_index_in_dim(logits, position - 1 - start, axis=1, keepdims=False)
    token = _pick(last, rng, position, temperature, top_k, vocab_size)
    return jax.lax.dynamic_update_index_in_dim(buffer, token.astype(buffer.dtype), position, 1)

  return jax.lax.fori_loop(prompt_len, total_len, body, buffer)


def _pick(logits, rng, position, temperature: float, top_k: int, vocab_size: int):
  """The next token from the last position's logits: greedy, or sampled."""
  if temperature == 0.0:
    return jnp.argmax(_filter_logits(logits, 1.0, 0, vocab_size), axis=-1)
  key = jax.random.fold_in(rng, position)
  return jax.random.categorical(key, _filter_logits(logits, temperature, top_k, vocab_size))


@functools.partial(jax.jit, static_argnames=('model', 'prompt_len', 'total_len', 'temperature',
                                             'top_k', 'vocab_size'))
def _generate_recurrent(params, buffer, rng, *, model, prompt_len, total_len, temperature,
                        top_k, vocab_size):
  """A recurrent model reads the prompt once, then one token per step with its carry."""
  logits, carry = model.apply({'params': params}, buffer[:, :prompt_len], deterministic=True)

  def body(position, state):
    last, carry, buffer = state
    token = _pick(last, rng, position, temperature, top_k, vocab_size).astype(buffer.dtype)
    buffer = jax.lax.dynamic_update_index_in_dim(buffer, token, position, 1)
    logits, carry = model.apply({'params': params}, token[:, None], carry=carry,
                                deterministic=True)
    return logits[:, -1], carry, buffer

  return jax.lax.fori_loop(prompt_len, total_len, body, (logits[:, -1], carry, buffer))[2]


def generate(params, model, prompt_ids, max_new_tokens: int, *, vocab_size: int,
             temperature: float = 0.8, top_k: int = 40, seed: int = 0, num_samples: int = 1):
  """Continues `prompt_ids` (non-empty) by `max_new_tokens` tokens: [num_samples, new]."""
  prompt_ids = np.asarray(prompt_ids, np.int32)
  if prompt_ids.ndim != 1 or prompt_ids.size == 0:
    raise ValueError('generation needs a non-empty prompt (one token at least)')
  prompt_len = len(prompt_ids)
  total_len = prompt_len + max_new_tokens
  buffer = np.zeros((num_samples, total_len), np.int32)
  buffer[:, :prompt_len] = prompt_ids
  loop = _generate_recurrent if getattr(model, 'recurrent', False) else _generate
  out = loop(params, jnp.asarray(buffer), jax.random.key(seed), model=model,
                  prompt_len=prompt_len, total_len=total_len, temperature=float(temperature),
                  top_k=int(top_k), vocab_size=vocab_size)
  return np.asarray(out)[:, prompt_len:]


def encode_prompt(tokenizer, prompt: str, clean_config=None) -> np.ndarray:
  """The prompt's ids, cleaned as the training text was; an empty prompt starts
  a new document (the EOS token)."""
  if clean_config is not None:
    prompt = cleaning.clean(prompt, clean_config)
  unknown = getattr(tokenizer, 'unknown_chars', lambda text: [])(prompt)
  if unknown:
    raise ValueError(f'the prompt has characters outside the vocabulary: {unknown}')
  ids = tokenizer.encode(prompt) if prompt else np.zeros(0, np.int32)
  return np.concatenate([[tokenizer.eos_id], ids]).astype(np.int32)


def decode_sample(tokenizer, ids) -> str:
  """Text of generated ids, stopping at the first end-of-document token."""
  ids = list(np.asarray(ids))
  if tokenizer.eos_id in ids:
    ids = ids[:ids.index(tokenizer.eos_id)]
  return tokenizer.decode(ids)


def sample_text(params, model, tokenizer, sample_config, num_samples: int = 1,
                clean_config=None) -> list[str]:
  prompt_ids = encode_prompt(tokenizer, sample_config.prompt, clean_config)
  generated = generate(params, model, prompt_ids, sample_config.max_new_tokens,
                       vocab_size=tokenizer.vocab_size, temperature=sample_config.temperature,
                       top_k=sample_config.top_k, seed=sample_config.seed,
                       num_samples=num_samples)
  return [sample_config.prompt + decode_sample(tokenizer, row) for row in generated]


def _main(argv):
  from absl import flags

  from lmjax import checkpoint, config as config_lib, models, sharding, train_state
  from lmjax.data import tokenizers
  flag_values = flags.FLAGS
  workdir = flag_values.workdir
  checkpoints = checkpoint.manager(workdir, read_only=True)
  step = flag_values.step if flag_values.step >= 0 else checkpoints.latest_step()
  if step is None:
    sys.exit(f'no checkpoint in {checkpoint.directory(workdir)}')
  if step not in checkpoints.all_steps():
    sys.exit(f'no checkpoint for step {step} in {checkpoint.directory(workdir)}; '
             f'steps present: {sorted(checkpoints.all_steps())}')
  config = config_lib.from_json(checkpoint.read_json(checkpoints, step, 'config'))
  tokenizer = tokenizers.from_json(checkpoint.read_json(checkpoints, step, 'tokenizer'))
  model = models.build_model(config.model, tokenizer.vocab_size, config.data.seq_len)
  # Only the optimizer state's structure matters here, not the schedule's values.
  tx, _ = train_state.make_optimizer(config.optimizer, config.train.num_steps, steps_per_epoch=1)
  mesh = sharding.make_mesh(config.mesh)
  abstract, _ = train_state.abstract_state(model, tx, config.data.seq_len, mesh,
                                           train_state.carry_rows(config, model))
  state = checkpoint.restore_state(checkpoints, step, abstract)
  sample_config = config.sample
  for name in ('prompt', 'max_new_tokens', 'temperature', 'top_k', 'seed'):
    if flag_values[name].present:
      sample_config[name] = flag_values[name].value
  try:
    texts = sample_text(state.params, model, tokenizer, sample_config, flag_values.num_samples,
                        config.data.clean)
  except ValueError as error:
    sys.exit(str(error))
  for i, text in enumerate(texts):
    print(f'--- sample {i} (step {step}) ---\n{text}')


def run():
  from absl import app, flags
  flags.DEFINE_string('workdir', None, 'Training workdir holding checkpoints/.', required=True)
  flags.DEFINE_integer('step', -1, 'Checkpoint step (-1 = latest).')
  flags.DEFINE_string('prompt', '', 'Text to continue.')
  flags.DEFINE_integer('max_new_tokens', 200, 'Tokens to generate.')
  flags.DEFINE_float('temperature', 0.8, 'Softmax temperature (0 = greedy).')
  flags.DEFINE_integer('top_k', 40, 'Sample among the k most likely tokens (0 = all).')
  flags.DEFINE_integer('seed', 0, 'Sampling seed.')
  flags.DEFINE_integer('num_samples', 1, 'Samples to draw.')
  app.run(_main)


if __name__ == '__main__':
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  run()
