"""A keyed permutation of [0, n) computed one index at a time, in O(1) memory.

An epoch's order over a corpus of any size must not be a materialised
permutation (8 bytes per example; 8 GB for a billion windows). `permute(i, n,
key)` instead evaluates a bijection of [0, n) at the indices asked for: a
balanced Feistel network over the smallest even power of two >= n, with
cycle-walking to stay inside [0, n) (the construction grain's index shuffle
and format-preserving encryption use). A Feistel network is a bijection for
any round function, so every index appears exactly once per epoch whatever
the key; its round function here is a 64-bit mixer (splitmix64's finaliser)
of (key, round, half), and `ROUNDS` rounds make the order indistinguishable
from a random one by the statistics tests/test_index_shuffle.py measures
(displacement, adjacency, and position uniformity over keys).

Cycle-walking: the Feistel domain has at most 4n elements, so an index leaves
[0, n) with probability < 3/4 per walk and the expected number of walks is < 4.
"""

import numpy as np

ROUNDS = 6
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix(x: np.ndarray) -> np.ndarray:
  """splitmix64's finaliser: a bijective avalanche mix of 64-bit words."""
  x = x.astype(np.uint64)
  with np.errstate(over='ignore'):
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def _half_bits(n: int) -> int:
  """Bits of each Feistel half: the domain 2**(2 * half) is the smallest >= n."""
  bits = max(1, int(n - 1).bit_length())
  return (bits + 1) // 2


def _feistel(x: np.ndarray, half: int, round_keys: np.ndarray) -> np.ndarray:
  mask = np.uint64((1 << half) - 1)
  left, right = x >> np.uint64(half), x & mask
  for round_key in round_keys:
    with np.errstate(over='ignore'):
      left, right = right, left ^ (_mix(right ^ round_key) & mask)
  return (left << np.uint64(half)) | right


def round_keys(key: int | tuple) -> np.ndarray:
  """ROUNDS 64-bit round keys from an integer key or a tuple of them (seed, epoch)."""
  words = np.asarray(np.atleast_1d(key), np.int64).astype(np.uint64)
  state = np.uint64(0x9E3779B97F4A7C15)
  for word in words:
    state = _mix(np.asarray([state ^ word]))[0]
  with np.errstate(over='ignore'):
    return _mix(state + np.arange(1, ROUNDS + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15))


def permute(indices, n: int, key) -> np.ndarray:
  """The images of `indices` (ints in [0, n)) under the permutation of [0, n)
  that `key` (an int, or a tuple such as (seed, epoch)) selects."""
  indices = np.asarray(indices, np.int64)
  if n < 1:
    raise ValueError(f'a permutation needs n >= 1; got {n}')
  if indices.size and (indices.min() < 0 or indices.max() >= n):
    raise ValueError(f'indices must lie in [0, {n})')
  if n == 1:
    return np.zeros_like(indices)
  half, keys = _half_bits(n), round_keys(key)
  x = indices.astype(np.uint64)
  outside = np.ones(x.shape, bool)
  limit = np.uint64(n)
  while outside.any():  # cycle-walk the indices whose image left [0, n)
    x[outside] = _feistel(x[outside], half, keys)
    outside = x >= limit
  return x.astype(np.int64)
