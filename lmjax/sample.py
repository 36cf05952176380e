"""Text generation from a trained model, and the `lmjax.sample` command.

    python -m lmjax.sample --workdir DIR --prompt "def " [--step N]

Generation runs as one jitted `lax.while_loop` over a fixed-size token buffer,
so it compiles once whatever the number of tokens: a Transformer decodes one
token per step against its key/value cache, a recurrent model steps its
carried state. Prompts of different lengths are read token by token, then
continued; greedy, temperature, top-k and top-p (nucleus) sampling; the loop
stops at the end-of-document token or after max_new_tokens.
"""

import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags

from lmjax import checkpoint
from lmjax import cpu_host
from lmjax import evaluate
from lmjax import models
from lmjax.data import cleaning
from lmjax.models import recurrent as recurrent_lib


def filter_logits(logits, temperature: float, top_k: int, vocab_size: int, top_p: float = 1.0):
  """Masks padded vocabulary entries, all but the top-k, and the tail beyond
  cumulative probability top_p (nucleus); then scales by the temperature."""
  logits = logits.astype(jnp.float32)
  logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_size, logits, -jnp.inf)
  if top_k > 0:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  logits = logits / max(temperature, 1e-6)
  if 0.0 < top_p < 1.0:
    ordered = jnp.sort(logits, axis=-1)[..., ::-1]
    before = jnp.cumsum(jax.nn.softmax(ordered, axis=-1), axis=-1) - jax.nn.softmax(ordered, -1)
    kept = jnp.where(before < top_p, ordered, jnp.inf)  # the smallest logit still inside p
    logits = jnp.where(logits < jnp.min(kept, axis=-1, keepdims=True), -jnp.inf, logits)
  return logits


def _pick(logits, rng, position, temperature: float, top_k: int, top_p: float, vocab_size: int):
  """The next token from the last position's logits: greedy, or sampled."""
  if temperature == 0.0:
    return jnp.argmax(filter_logits(logits, 1.0, 0, vocab_size), axis=-1)
  key = jax.random.fold_in(rng, position)
  return jax.random.categorical(key, filter_logits(logits, temperature, top_k, vocab_size, top_p))


_STATIC = ('model', 'total_len', 'temperature', 'top_k', 'top_p', 'vocab_size', 'eos_id')


@functools.partial(jax.jit, static_argnames=_STATIC)
def _generate_recompute(
  params,
  buffer,
  prompt_lens,
  rng,
  *,
  model,
  total_len,
  temperature,
  top_k,
  top_p,
  vocab_size,
  eos_id,
):
  """Decoding without a cache: every new token recomputes the model over the
  window of the last max_len tokens (the path for learned positions past the
  context). Prompts may differ in length: all rows share the window ending at
  the position being generated, and causal attention keeps each row's logits
  there a function of that row's own last max_len tokens; a row still inside
  its prompt keeps the prompt's token."""
  del eos_id
  window = min(model.config.max_len, total_len)

  def body(position, buffer):
    start = jnp.maximum(position - window, 0)
    context = jax.lax.dynamic_slice_in_dim(buffer, start, window, axis=1)  # [batch, window]
    logits = model.apply({'params': params}, context, deterministic=True)
    last = jax.lax.dynamic_index_in_dim(logits, position - 1 - start, axis=1, keepdims=False)
    sampled = _pick(last, rng, position, temperature, top_k, top_p, vocab_size)
    token = jnp.where(position < prompt_lens, buffer[:, position], sampled.astype(buffer.dtype))
    return jax.lax.dynamic_update_index_in_dim(buffer, token, position, 1)

  return jax.lax.fori_loop(jnp.min(prompt_lens), total_len, body, buffer)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _generate_stepwise(
  params,
  buffer,
  prompt_lens,
  rng,
  *,
  model,
  total_len,
  temperature,
  top_k,
  top_p,
  vocab_size,
  eos_id,
):
  """One token per row per step, in one `lax.while_loop`: a Transformer against its
  key/value cache, a recurrent model with its carried state. Row i reads its
  prompt (the first prompt_lens[i] tokens of buffer) and then generates; the loop
  stops when every row has generated `eos_id` or the buffer is full."""
  rows = buffer.shape[0]
  recurrent = models.is_recurrent(model)
  if recurrent:
    state = recurrent_lib.initial_carry(model, rows)
  else:
    shapes = jax.eval_shape(
      lambda: model.init(
        jax.random.key(0), buffer[:, :1], positions=jnp.zeros((rows, 1), jnp.int32), decode=True
      )
    )['cache']
    state = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

  def step(token, position, state):
    if recurrent:
      logits, state = model.apply({'params': params}, token[:, None], carry=state)
      return logits[:, 0], state
    logits, variables = model.apply(
      {'params': params, 'cache': state},
      token[:, None],
      positions=jnp.full((rows, 1), position, jnp.int32),
      decode=True,
      mutable=['cache'],
    )
    return logits[:, 0], variables['cache']

  def cond(carry):
    position, _, _, done = carry
    return (position < total_len - 1) & ~jnp.all(done)

  def body(carry):
    position, state, buffer, done = carry
    logits, state = step(buffer[:, position], position, state)
    position = position + 1
    sampled = _pick(logits, rng, position, temperature, top_k, top_p, vocab_size)
    in_prompt = position < prompt_lens
    token = jnp.where(in_prompt, buffer[:, position], sampled.astype(buffer.dtype))
    buffer = jax.lax.dynamic_update_index_in_dim(buffer, token, position, 1)
    done = done | (~in_prompt & (token == eos_id))
    return position, state, buffer, done

  start = (jnp.zeros((), jnp.int32), state, buffer, jnp.zeros(rows, bool))
  return jax.lax.while_loop(cond, body, start)[2]


def lower_stepwise(params, buffer, prompt_lens, rng, *, model):
  """The stepwise decode loop (key/value cache or carried state) lowered for
  abstract arguments, as `generate` runs it: `lmjax.aot` compiles it ahead of time."""
  return _generate_stepwise.lower(
    params,
    buffer,
    prompt_lens,
    rng,
    model=model,
    total_len=buffer.shape[1],
    temperature=1.0,
    top_k=40,
    top_p=1.0,
    vocab_size=model.config.vocab_size,
    eos_id=-1,
  )


def generate(
  params,
  model,
  prompt_ids,
  max_new_tokens: int,
  *,
  vocab_size: int,
  temperature: float = 0.8,
  top_k: int = 40,
  top_p: float = 1.0,
  seed: int = 0,
  num_samples: int = 1,
  eos_id: int = -1,
  use_cache: bool = True,
):
  """Continues each prompt by `max_new_tokens` tokens.

  `prompt_ids`: one non-empty id array (drawn `num_samples` times), or a list of
  them (of any lengths). Returns [rows, max_new_tokens] ids after each prompt
  (past an `eos_id` the rest is unspecified). Transformers decode with a
  key/value cache (`use_cache=False`: recompute over the last max_len tokens;
  learned positions fall back to it when prompt + new tokens exceed the
  context); recurrent models step their carried state. Deterministic for a seed.
  """
  prompts = (
    [prompt_ids]
    if isinstance(prompt_ids, np.ndarray) or (len(prompt_ids) and np.isscalar(prompt_ids[0]))
    else list(prompt_ids)
  )
  prompts = [np.asarray(p, np.int32) for p in prompts for _ in range(num_samples)]
  if any(p.ndim != 1 or p.size == 0 for p in prompts):
    raise ValueError('generation needs a non-empty prompt (one token at least)')
  lengths = np.array([len(p) for p in prompts], np.int32)
  total_len = int(lengths.max()) + max_new_tokens
  buffer = np.zeros((len(prompts), total_len), np.int32)
  for row, p in enumerate(prompts):
    buffer[row, : len(p)] = p
  recurrent = models.is_recurrent(model)
  fits = recurrent or model.config.positions == 'rope' or total_len <= model.config.max_len
  loop = (
    _generate_recompute if not recurrent and (not use_cache or not fits) else (_generate_stepwise)
  )
  out = np.asarray(
    loop(
      params,
      jnp.asarray(buffer),
      jnp.asarray(lengths),
      jax.random.key(seed),
      model=model,
      total_len=total_len,
      temperature=float(temperature),
      top_k=int(top_k),
      top_p=float(top_p),
      vocab_size=vocab_size,
      eos_id=int(eos_id),
    )
  )
  return np.stack([out[row, n : n + max_new_tokens] for row, n in enumerate(lengths)])


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
    ids = ids[: ids.index(tokenizer.eos_id)]
  return tokenizer.decode(ids)


def sample_text(
  params, model, tokenizer, sample_config, num_samples: int = 1, clean_config=None, prompts=None
) -> list[str]:
  """`num_samples` continuations of each prompt (default: sample_config.prompt), as text."""
  prompts = [sample_config.prompt] if prompts is None else list(prompts)
  encoded = [encode_prompt(tokenizer, prompt, clean_config) for prompt in prompts]
  generated = generate(
    params,
    model,
    encoded,
    sample_config.max_new_tokens,
    vocab_size=tokenizer.vocab_size,
    temperature=sample_config.temperature,
    top_k=sample_config.top_k,
    top_p=sample_config.top_p,
    seed=sample_config.seed,
    num_samples=num_samples,
    eos_id=tokenizer.eos_id,
  )
  return [
    prompts[i // num_samples] + decode_sample(tokenizer, row) for i, row in enumerate(generated)
  ]


def _main(argv):
  del argv
  checkpoint.quiet_logs()
  cpu_host.prepare()
  flag_values = flags.FLAGS
  try:
    restored = evaluate.restore_for_inference(
      flag_values.workdir, flag_values.step, log=lambda m: print(m, file=sys.stderr)
    )
  except checkpoint.ERRORS as error:
    sys.exit(f'error: {error}')
  config, tokenizer, model, params = (
    restored.config,
    restored.tokenizer,
    restored.model,
    restored.params,
  )
  if not restored.task.generates_text:
    sys.exit(
      f'error: {flag_values.workdir} trained task={config.task!r} '
      f'(model.family={config.model.family!r}); only a causal language model '
      "(task='lm') generates text"
    )
  sample_config = config.sample
  for name in ('max_new_tokens', 'temperature', 'top_k', 'top_p', 'seed'):
    if flag_values[name].present:
      sample_config[name] = flag_values[name].value
  prompts = list(flag_values.prompt or [])
  if flag_values.prompt_file:
    with open(flag_values.prompt_file, encoding='utf-8') as f:
      prompts += [line.rstrip('\n') for line in f if line.strip()]
  try:
    texts = sample_text(
      params,
      model,
      tokenizer,
      sample_config,
      flag_values.num_samples,
      config.data.clean,
      prompts or None,
    )
  except ValueError as error:
    sys.exit(str(error))
  for i, text in enumerate(texts):
    print(f'--- sample {i} (step {restored.step}) ---\n{text}')


def run():
  flags.DEFINE_string('workdir', None, 'Training workdir holding checkpoints/.', required=True)
  flags.DEFINE_string('step', 'latest', "'latest' (newest intact), 'best', or a step number.")
  flags.DEFINE_multi_string(
    'prompt',
    None,
    "Text to continue (repeat for a batch of prompts; none = the run's sample.prompt).",
  )
  flags.DEFINE_string('prompt_file', '', 'A file of prompts, one per line.')
  flags.DEFINE_float(
    'top_p',
    1.0,
    'Nucleus sampling: keep the most likely tokens up to this probability mass (1 = all).',
  )
  flags.DEFINE_integer('max_new_tokens', 200, 'Tokens to generate.')
  flags.DEFINE_float('temperature', 0.8, 'Softmax temperature (0 = greedy).')
  flags.DEFINE_integer('top_k', 40, 'Sample among the k most likely tokens (0 = all).')
  flags.DEFINE_integer('seed', 0, 'Sampling seed.')
  flags.DEFINE_integer('num_samples', 1, 'Samples to draw.')
  app.run(_main)


if __name__ == '__main__':
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  run()
