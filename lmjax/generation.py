"""Generation: one jitted loop per call, whatever the number of tokens.

A Transformer decodes one token per step against its key/value cache (an
encoder-decoder against its cross-attention cache too), a recurrent model
steps its carried state. Prompts of different lengths are read token by
token, then continued: greedy, temperature, top-k and top-p (nucleus)
sampling (`_generate_stepwise`), or beam search with a length penalty
(`_beam_search`); a loop stops at the end-of-document token or after
max_new_tokens. `lmjax.sample` (the command) and the seq2seq task's
evaluation generate through `generate`.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lmjax import models
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


def _decoder(model, params, rows: int, encoder=None):
  """(prime, step) of a model decoding one token per row: `prime(token)` reads
  each row's first token (position 0) from a fresh state, and
  `step(token, position, state)` the next one; both return (logits [rows,
  vocab] for the next position, state). A Transformer's state is its key/value
  cache, a recurrent model's its carry; an encoder-decoder's first step
  encodes `encoder` (encoder_tokens, encoder_segment_ids [rows, source length])
  once into its cross-attention cache."""
  if models.is_recurrent(model):

    def step(token, position, state):
      logits, state = model.apply({'params': params}, token[:, None], carry=state)
      return logits[:, 0], state

    return (lambda token: step(token, 0, recurrent_lib.initial_carry(model, rows))), step

  def run(token, position, cache, **encoder_batch):
    variables = {'params': params} if cache is None else {'params': params, 'cache': cache}
    logits, updated = model.apply(
      variables,
      token[:, None],
      positions=jnp.full((rows, 1), position, jnp.int32),
      decode=True,
      mutable=['cache'],
      **encoder_batch,
    )
    return logits[:, 0], updated['cache']

  encoder_batch = {} if encoder is None else dict(encoder)
  return (lambda token: run(token, 0, None, **encoder_batch)), run


def _state_batch_axis(model) -> int:
  """The rows axis of a decoding state's arrays: a recurrent carry [layers,
  states, rows, hidden]; a scanned cache [layers, rows, ...]; else [rows, ...]."""
  if models.is_recurrent(model):
    return 2
  return 1 if model.config.scan_layers else 0


@functools.partial(jax.jit, static_argnames=_STATIC)
def _generate_stepwise(
  params,
  buffer,
  prompt_lens,
  rng,
  encoder=None,
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
  key/value cache (an encoder-decoder's cross-attention cache beside it), a
  recurrent model with its carried state. Row i reads its prompt (the first
  prompt_lens[i] tokens of buffer) and then generates; the loop stops when
  every row has generated `eos_id` or the buffer is full."""
  rows = buffer.shape[0]
  prime, step = _decoder(model, params, rows, encoder)

  def cond(carry):
    position, _, _, _, done = carry
    return (position < total_len - 1) & ~jnp.all(done)

  def body(carry):
    position, logits, state, buffer, done = carry
    position = position + 1
    sampled = _pick(logits, rng, position, temperature, top_k, top_p, vocab_size)
    in_prompt = position < prompt_lens
    token = jnp.where(in_prompt, buffer[:, position], sampled.astype(buffer.dtype))
    buffer = jax.lax.dynamic_update_index_in_dim(buffer, token, position, 1)
    done = done | (~in_prompt & (token == eos_id))
    logits, state = step(token, position, state)
    return position, logits, state, buffer, done

  logits, state = prime(buffer[:, 0])
  start = (jnp.zeros((), jnp.int32), logits, state, buffer, jnp.zeros(rows, bool))
  return jax.lax.while_loop(cond, body, start)[3]


_NEG = -1.0e9  # the log-probability of what cannot happen (finite: no inf - inf)


def brevity_penalty(length, alpha: float):
  """GNMT's length normalisation ((5 + length) / 6) ** alpha: a finished
  hypothesis scores its log-probability divided by this (alpha 0: by 1)."""
  return ((5.0 + length.astype(jnp.float32)) / 6.0) ** alpha


_BEAM_STATIC = ('model', 'total_len', 'beam_size', 'length_penalty', 'vocab_size', 'eos_id')


@functools.partial(jax.jit, static_argnames=_BEAM_STATIC)
def _beam_search(
  params,
  buffer,
  prompt_lens,
  encoder=None,
  *,
  model,
  total_len,
  beam_size,
  length_penalty,
  vocab_size,
  eos_id,
):
  """Beam search in one `lax.while_loop`, for every decoding model (the state of
  each of the rows x beams hypotheses is reordered with its beam at each step).

  Each step extends every live hypothesis by every token and keeps the 2K best
  extensions (K = beam_size): those that end with `eos_id` among the K best
  become finished hypotheses (scored log p / brevity_penalty), the K best of the
  rest stay live. A row stops once its K-th best finished score beats what any
  live one could still reach; returns each row's best finished hypothesis (the
  best live one if none finished) as [rows, total_len] and its score [rows]. A
  row reads its prompt first (one live hypothesis, tokens forced); with K = 1
  and alpha 0 this is greedy decoding."""
  rows, k = buffer.shape[0], beam_size
  flat = lambda x: jnp.repeat(x, k, axis=0)  # [rows, ...] -> [rows * k, ...]
  encoder = None if encoder is None else jax.tree.map(flat, encoder)
  prime, step = _decoder(model, params, rows * k, encoder)
  axis = _state_batch_axis(model)
  max_penalty = brevity_penalty(total_len - prompt_lens, length_penalty)  # [rows]
  columns = jnp.arange(total_len)

  def cond(carry):
    position, _, _, _, live_scores, _, finished_scores = carry
    best_live = jnp.max(live_scores, axis=1) / max_penalty
    done = (position + 1 >= prompt_lens) & (jnp.min(finished_scores, axis=1) >= best_live)
    return (position < total_len - 1) & ~jnp.all(done)

  def body(carry):
    position, logits, state, live, live_scores, finished, finished_scores = carry
    position = position + 1  # the column chosen now
    logp = jax.nn.log_softmax(filter_logits(logits, 1.0, 0, vocab_size), axis=-1)
    logp = jnp.maximum(logp, _NEG).reshape(rows, k, -1)  # padded vocabulary: _NEG
    vocab = logp.shape[-1]
    in_prompt = position < prompt_lens  # [rows]
    forced = jax.lax.dynamic_index_in_dim(buffer, position, 1, keepdims=False)
    forced = jnp.where(jnp.arange(vocab) == forced[:, None, None], 0.0, _NEG)
    logp = jnp.where(in_prompt[:, None, None], forced, logp)
    scores, index = jax.lax.top_k((live_scores[:, :, None] + logp).reshape(rows, k * vocab), 2 * k)
    parent, token = index // vocab, index % vocab  # [rows, 2k]
    ends = (token == eos_id) & ~in_prompt[:, None]
    # Finished: the extensions ending here, among the k best.
    length = position + 1 - prompt_lens  # generated tokens, the end token included
    penalised = scores / brevity_penalty(length, length_penalty)[:, None]
    eligible = ends & (jnp.arange(2 * k) < k)
    candidates = jnp.take_along_axis(live, parent[:, :, None], axis=1)  # [rows, 2k, total]
    candidates = jnp.where(columns == position, token[:, :, None], candidates)
    pooled = jnp.concatenate([finished_scores, jnp.where(eligible, penalised, _NEG)], axis=1)
    finished_scores, best = jax.lax.top_k(pooled, k)
    finished = jnp.take_along_axis(
      jnp.concatenate([finished, candidates], axis=1), best[:, :, None], axis=1
    )
    # Live: the k best extensions that do not end.
    live_scores, keep = jax.lax.top_k(jnp.where(ends, _NEG, scores), k)
    live = jnp.take_along_axis(candidates, keep[:, :, None], axis=1)
    parent, token = (jnp.take_along_axis(x, keep, axis=1) for x in (parent, token))
    rows_of = (jnp.arange(rows)[:, None] * k + parent).reshape(-1)
    state = jax.tree.map(lambda x: jnp.take(x, rows_of, axis=axis), state)
    logits, state = step(token.reshape(-1).astype(buffer.dtype), position, state)
    return position, logits, state, live, live_scores, finished, finished_scores

  logits, state = prime(flat(buffer[:, 0]))
  live = jnp.broadcast_to(buffer[:, None], (rows, k, total_len))
  live_scores = jnp.where(jnp.arange(k) == 0, 0.0, _NEG) * jnp.ones((rows, 1))
  finished_scores = jnp.full((rows, k), 2 * _NEG)
  start = (jnp.zeros((), jnp.int32), logits, state, live, live_scores, live, finished_scores)
  position, _, _, live, live_scores, finished, finished_scores = jax.lax.while_loop(
    cond, body, start
  )
  final_live = live_scores / brevity_penalty(position + 1 - prompt_lens, length_penalty)[:, None]
  any_finished = finished_scores[:, 0] > _NEG
  tokens = jnp.where(any_finished[:, None], finished[:, 0], live[:, 0])
  return tokens, jnp.where(any_finished, finished_scores[:, 0], final_live[:, 0])


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
  beam_size: int = 0,
  length_penalty: float = 0.0,
  encoder_ids=None,
  return_scores: bool = False,
):
  """Continues each prompt by `max_new_tokens` tokens.

  `prompt_ids`: one non-empty id array (drawn `num_samples` times), or a list of
  them (of any lengths). Returns [rows, max_new_tokens] ids after each prompt
  (past an `eos_id` the rest is unspecified). Transformers decode with a
  key/value cache (`use_cache=False`: recompute over the last max_len tokens;
  learned positions fall back to it when prompt + new tokens exceed the
  context); recurrent models step their carried state. Deterministic for a seed.

  `beam_size` k >= 1 runs beam search of k beams (`_beam_search`, with GNMT's
  `length_penalty` alpha) instead of greedy or sampled decoding (0); then
  `return_scores` also returns each row's score. An encoder-decoder takes each
  row's source in `encoder_ids` (a list of id arrays); its prompts are then
  the decoder's start (the end-of-document token).
  """
  prompts = (
    [prompt_ids]
    if isinstance(prompt_ids, np.ndarray) or (len(prompt_ids) and np.isscalar(prompt_ids[0]))
    else list(prompt_ids)
  )
  prompts = [np.asarray(p, np.int32) for p in prompts for _ in range(num_samples)]
  if any(p.ndim != 1 or p.size == 0 for p in prompts):
    raise ValueError('generation needs a non-empty prompt (one token at least)')
  if beam_size < 0:
    raise ValueError(f'beam_size must be 0 (no beam search) or more; got {beam_size}')
  lengths = np.array([len(p) for p in prompts], np.int32)
  total_len = int(lengths.max()) + max_new_tokens
  buffer = np.zeros((len(prompts), total_len), np.int32)
  for row, p in enumerate(prompts):
    buffer[row, : len(p)] = p
  encoder = None
  if models.is_encoder_decoder(model):
    if encoder_ids is None:
      raise ValueError('an encoder-decoder generates from sources: pass encoder_ids')
    sources = [np.asarray(e, np.int32) for e in encoder_ids for _ in range(num_samples)]
    if len(sources) != len(prompts):
      raise ValueError(f'{len(sources)} sources for {len(prompts)} prompts')
    width = max(len(e) for e in sources)
    tokens = np.zeros((len(sources), width), np.int32)
    for row, e in enumerate(sources):
      tokens[row, : len(e)] = e
    encoder = {
      'encoder_tokens': jnp.asarray(tokens),
      'encoder_segment_ids': jnp.asarray((np.arange(width) < lengths_of(sources)[:, None]) * 1),
    }
  recurrent = models.is_recurrent(model)
  fits = recurrent or model.config.positions == 'rope' or total_len <= model.config.max_len
  if beam_size:
    if not recurrent and not fits:
      raise ValueError(
        f'beam search decodes with the key/value cache: prompt and new tokens ({total_len}) '
        f"exceed the model's {model.config.max_len} learned positions"
      )
    tokens, scores = _beam_search(
      params,
      jnp.asarray(buffer),
      jnp.asarray(lengths),
      encoder,
      model=model,
      total_len=total_len,
      beam_size=int(beam_size),
      length_penalty=float(length_penalty),
      vocab_size=vocab_size,
      eos_id=int(eos_id),
    )
    out = np.asarray(tokens)
    generated = np.stack([out[row, n : n + max_new_tokens] for row, n in enumerate(lengths)])
    return (generated, np.asarray(scores)) if return_scores else generated
  cached = recurrent or encoder is not None or (use_cache and fits)
  loop = _generate_stepwise if cached else _generate_recompute
  extra = () if loop is _generate_recompute else (encoder,)
  out = np.asarray(
    loop(
      params,
      jnp.asarray(buffer),
      jnp.asarray(lengths),
      jax.random.key(seed),
      *extra,
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


def lengths_of(arrays) -> np.ndarray:
  return np.array([len(a) for a in arrays], np.int32)


def decode_sample(tokenizer, ids) -> str:
  """Text of generated ids, stopping at the first end-of-document token."""
  ids = list(np.asarray(ids))
  if tokenizer.eos_id in ids:
    ids = ids[: ids.index(tokenizer.eos_id)]
  return tokenizer.decode(ids)
