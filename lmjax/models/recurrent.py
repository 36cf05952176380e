"""Recurrent language models: multi-layer Elman RNN (tanh), LSTM and GRU.

Time is looped with `jax.lax.scan`, so compile time does not grow with the
sequence length. Each layer first projects the whole sequence's inputs in one
large matmul (`x W_ih + b`, all time steps at once); the scan then only adds
`h W_hh` and applies the gates, step by step. Dropout acts on the
non-recurrent connections only (embeddings, between layers, before the
softmax), as in Zaremba et al. (2014).

The hidden state (the "carry") is one array [layers, states, batch, hidden]
(states = 2 for the LSTM's (h, c), else 1). `__call__` takes the carry of the
previous batch (None = zeros) and a per-row `reset` (1.0 = start from zeros),
and returns the logits with the new carry, through which no gradient flows
(truncated backpropagation through time).
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lmjax.models import layers
from lmjax.models import model_config

CELLS = ('rnn', 'lstm', 'gru')
_GATES = {'rnn': 1, 'lstm': 4, 'gru': 3}
CARRY_AXES = (None, None, 'batch', None)  # logical axes of the carry


def is_recurrent(model) -> bool:
  """Recurrent models take and return a carry. A classifier is not, whatever its
  backbone: it takes the Transformer's arguments and returns no carry."""
  return getattr(model, 'recurrent', False)


def carry_shape(model, batch_size: int) -> tuple[int, ...]:
  c = model.config
  return (c.num_layers, 2 if c.family == 'lstm' else 1, batch_size, c.hidden_dim)


def initial_carry(model, batch_size: int):
  return jnp.zeros(carry_shape(model, batch_size), jnp.float32)


def _sigmoid(x):
  # The same function as jax.nn.sigmoid, written with tanh: XLA:CPU vectorises
  # tanh well, and computing it once over all gates is ~5x faster inside a cell.
  return 0.5 * jnp.tanh(0.5 * x) + 0.5


def _lstm(gx, gh, state):
  h, c = state
  z = gx + gh
  hidden = h.shape[-1]
  gates = _sigmoid(z)  # i, f, o use it; g uses tanh
  i, f, o = gates[:, :hidden], gates[:, hidden : 2 * hidden], gates[:, 3 * hidden :]
  c = f * c + i * jnp.tanh(z[:, 2 * hidden : 3 * hidden])
  return o * jnp.tanh(c), c


def _gru(gx, gh, state):
  (h,) = state
  hidden = h.shape[-1]
  rz = _sigmoid(gx[:, : 2 * hidden] + gh[:, : 2 * hidden])
  r, z = rz[:, :hidden], rz[:, hidden:]
  n = jnp.tanh(gx[:, 2 * hidden :] + r * gh[:, 2 * hidden :])
  return ((1.0 - z) * n + z * h,)


def _rnn(gx, gh, state):
  del state
  return (jnp.tanh(gx + gh),)


# A cell is `new_state = cell(gx_t, gh_t, state)`, with the input projection
# gx_t = x_t W_ih + b_ih and the recurrent one gh_t = h_{t-1} W_hh (+ b_hh); a
# state is a tuple of [batch, hidden] arrays, h first (a tuple, not a stacked
# array: stacking inside the loop costs as much as the matmul on CPU).
_CELL_FNS = {'lstm': _lstm, 'gru': _gru, 'rnn': _rnn}


def forward(cell, gx, w_hh, b_hh, state):
  def body(state, gx_t):
    gh = state[0] @ w_hh if b_hh is None else state[0] @ w_hh + b_hh
    new = _CELL_FNS[cell](gx_t, gh, state)
    return new, (new, gh)

  final, (states, ghs) = jax.lax.scan(body, state, gx)
  return final, states, ghs


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def recurrence(cell, gx, w_hh, b_hh, state):
  """Runs `cell` over time: gx [time, batch, gates * hidden] (inputs already
  projected), w_hh [hidden, gates * hidden], b_hh [gates * hidden] (the GRU's;
  None for the others), state (a
  tuple of [batch, hidden]) -> (outputs h_t [time, batch, hidden], final state).

  Its backward pass is hand-scheduled the way cuDNN and PyTorch do it: the
  reverse loop only propagates the state gradient (one `dgh W_hh^T` matmul and
  the cell's elementwise backward per step) and stores each step's gradient of
  gh; the weight gradient is then one large matmul over all steps, instead of
  a small outer product accumulated into the loop carry at every step (what
  differentiating `lax.scan` does).
  """
  final, states, _ = forward(cell, gx, w_hh, b_hh, state)
  return states[0], final


def _recurrence_forward(cell, gx, w_hh, b_hh, state):
  final, states, ghs = forward(cell, gx, w_hh, b_hh, state)
  return (states[0], final), (gx, w_hh, state, states, ghs)


def _lstm_backward(gx, gh, previous, new, d_new):
  """Hand-written LSTM step backward -> (d_gx, d_gh, d_previous without the
  d_gh W_hh^T term); d_gx == d_gh, since z = gx + gh."""
  (_, c_prev), (_, c), (dh, dc) = previous, new, d_new
  hidden = c.shape[-1]
  z = gx + gh
  gates = _sigmoid(z)
  i, f, o = gates[:, :hidden], gates[:, hidden : 2 * hidden], gates[:, 3 * hidden :]
  g = jnp.tanh(z[:, 2 * hidden : 3 * hidden])
  tanh_c = jnp.tanh(c)
  dc = dc + dh * o * (1.0 - tanh_c * tanh_c)
  d_z = jnp.concatenate(
    [
      dc * g * i * (1.0 - i),
      dc * c_prev * f * (1.0 - f),
      dc * i * (1.0 - g * g),
      dh * tanh_c * o * (1.0 - o),
    ],
    axis=-1,
  )
  return d_z, d_z, (jnp.zeros_like(dh), dc * f)


def _rnn_backward(gx, gh, previous, new, d_new):
  del gx, gh, previous
  d_z = d_new[0] * (1.0 - new[0] * new[0])
  return d_z, d_z, (jnp.zeros_like(d_z[:, :0]),)


def _generic_backward(cell):
  def backward(gx, gh, previous, new, d_new):
    del new
    _, vjp = jax.vjp(_CELL_FNS[cell], gx, gh, previous)
    return vjp(d_new)

  return backward


_BACKWARD_FNS = {'lstm': _lstm_backward, 'rnn': _rnn_backward, 'gru': _generic_backward('gru')}


def _recurrence_backward(cell, residuals, cotangents):
  gx, w_hh, state0, states, ghs = residuals
  d_outputs, d_final = cotangents
  # The state before each step: state0, then the states of steps 0 .. T-2.
  previous = tuple(jnp.concatenate([s0[None], s[:-1]]) for s0, s in zip(state0, states))
  w_t = w_hh.T  # transposed once, not in every step
  same = cell != 'gru'  # d_gx == d_gh: keep one of them

  def body(d_state, inputs):
    gx_t, gh_t, prev_t, new_t, d_out_t = inputs
    d_state = (d_state[0] + d_out_t,) + d_state[1:]
    d_gx, d_gh, d_prev = _BACKWARD_FNS[cell](gx_t, gh_t, prev_t, new_t, d_state)
    d_h = d_gh @ w_t
    d_prev = (d_h if cell == 'rnn' else d_prev[0] + d_h,) + d_prev[1:]
    return d_prev, (d_gh,) if same else (d_gx, d_gh)

  d_state0, d_steps = jax.lax.scan(
    body, d_final, (gx, ghs, previous, states, d_outputs), reverse=True
  )
  d_gh = d_steps[-1]
  d_gx = d_gh if same else d_steps[0]
  d_w_hh = jnp.einsum('tbh,tbg->hg', previous[0], d_gh)
  d_b_hh = jnp.sum(d_gh, axis=(0, 1)) if cell == 'gru' else None
  return d_gx, d_w_hh, d_b_hh, d_state0


recurrence.defvjp(_recurrence_forward, _recurrence_backward)


class RecurrentLayer(nn.Module):
  """One recurrent layer over a time-major sequence [time, batch, features]."""

  cell: str
  hidden_dim: int
  init_scale: float
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, xs, state, token_ids=None):
    """xs [time, batch, in] -> (h_t [time, batch, hidden], final state); state is
    [states, batch, hidden]. With `token_ids` [time, batch], xs is instead the
    embedding table [vocab, in]: the layer projects the table (vocab rows) and
    looks the projections up, which is cheaper than projecting time x batch
    embedded tokens when the vocabulary is smaller than that, and the same
    function."""
    gates, hidden = _GATES[self.cell], self.hidden_dim
    init = nn.initializers.uniform(2 * self.init_scale)
    shifted = lambda key, shape, dtype: init(key, shape, dtype) - self.init_scale
    param = lambda name, shape, names: self.param(
      name, layers.partitioned(shifted, names), shape, self.param_dtype
    )
    w_ih = param('w_ih', (xs.shape[-1], gates, hidden), ('embed', 'gates', 'hidden'))
    w_hh = param('w_hh', (hidden, gates, hidden), ('hidden_in', 'gates', 'hidden'))
    b_ih = param('b_ih', (gates, hidden), ('gates', 'hidden'))
    # The GRU keeps a separate recurrent bias (it sits inside r * (h W_hn + b_hn)).
    b_hh = param('b_hh', (gates, hidden), ('gates', 'hidden')) if self.cell == 'gru' else None
    xs, w_ih, w_hh, b_ih = nn.dtypes.promote_dtype(xs, w_ih, w_hh, b_ih, dtype=self.dtype)
    if token_ids is None:
      gx = jnp.einsum('tbi,igh->tbgh', xs, w_ih) + b_ih  # every step's input projection at once
    else:
      gx = (jnp.einsum('vi,igh->vgh', xs, w_ih) + b_ih)[token_ids]
    gx = gx.reshape(*gx.shape[:2], gates * hidden)
    w_hh = w_hh.reshape(hidden, gates * hidden)
    if b_hh is not None:
      b_hh = b_hh.astype(self.dtype).reshape(gates * hidden)
    hs, final = recurrence(self.cell, gx, w_hh, b_hh, tuple(state.astype(self.dtype)))
    return hs, jnp.stack(final)


class RecurrentLM(nn.Module):
  """Token ids [batch, length] (+ carry) -> (logits [batch, length, vocab], carry);
  `config.family` is the cell."""

  config: model_config.ModelConfig
  recurrent = True  # class attribute: callers pass and receive a carry

  @nn.compact
  def __call__(self, tokens, carry=None, reset=None, deterministic: bool = True, head: bool = True):
    """(logits [batch, length, vocab], next carry); `head=False` returns the top
    layer's outputs [batch, length, hidden] instead of logits (a classifier's
    backbone: the output at a row's last token is its final state)."""
    c = self.config
    if c.family not in CELLS:
      raise ValueError(f'unknown recurrent cell {c.family!r}; known: {", ".join(CELLS)}')
    if c.tie_embeddings and c.embed_dim != c.hidden_dim:
      raise ValueError(
        f'model.tie_embeddings needs model.embed_dim ({c.embed_dim}) == '
        f'model.hidden_dim ({c.hidden_dim})'
      )
    batch = tokens.shape[0]
    scale = c.init_scale or c.hidden_dim**-0.5
    init = nn.initializers.uniform(2 * scale)
    shifted = lambda key, shape, dtype: init(key, shape, dtype) - scale
    if carry is None:
      carry = initial_carry(self, batch)
    if reset is not None:  # rows that start a new epoch forget their state
      carry = carry * (1.0 - reset.astype(carry.dtype))[None, None, :, None]
    carry = nn.with_logical_constraint(carry, CARRY_AXES)
    embed_init = shifted if c.init_scale else layers.default_init
    embed = nn.Embed(
      c.vocab_size,
      c.embed_dim,
      dtype=c.dtype,
      param_dtype=c.param_dtype,
      name='embed',
      embedding_init=layers.partitioned(embed_init, ('vocab', 'embed')),
    )
    time_major = tokens.T
    # Small vocabulary, no dropout on the embeddings: layer 0 projects the table.
    lookup = (deterministic or not c.dropout) and c.vocab_size < tokens.size
    if lookup:
      embed(time_major[:1, :1])  # (creates the table on init)
      x = jnp.asarray(embed.embedding, c.dtype)
    else:
      x = nn.Dropout(c.dropout)(embed(time_major), deterministic=deterministic)
    states = []
    for i in range(c.num_layers):
      x, state = RecurrentLayer(
        c.family,
        c.hidden_dim,
        scale,
        dtype=c.dtype,
        param_dtype=c.param_dtype,
        name=f'layer_{i}',
      )(x, carry[i], time_major if lookup and i == 0 else None)
      x = nn.Dropout(c.dropout)(x, deterministic=deterministic)
      states.append(state)
    new_carry = jax.lax.stop_gradient(jnp.stack(states).astype(jnp.float32))
    x = jnp.swapaxes(x, 0, 1)  # batch-major before the (large) vocabulary projection
    if not head:
      return x, new_carry
    if c.tie_embeddings:
      logits = embed.attend(x)
    else:
      kernel = self.param(
        'unembed',
        layers.partitioned(shifted, ('embed', 'vocab')),
        (c.hidden_dim, c.vocab_size),
        c.param_dtype,
      )
      bias = self.param(
        'unembed_bias',
        layers.partitioned(nn.initializers.zeros if not c.init_scale else shifted, ('vocab',)),
        (c.vocab_size,),
        c.param_dtype,
      )
      x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=c.dtype)
      logits = jnp.einsum('bth,hv->btv', x, kernel) + bias
    return nn.with_logical_constraint(logits, ('batch', 'length', 'vocab')), new_carry
