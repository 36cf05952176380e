"""The keyed index shuffle: a bijection of [0, n) for every n and key, computed
one index at a time, and mixed well enough to stand for a random order."""

import numpy as np
import pytest

from lmjax.data import index_shuffle


@pytest.mark.parametrize('n', [1, 2, 3, 5, 17, 64, 1000, 65_539])
def test_every_index_appears_exactly_once(n):
  order = index_shuffle.permute(np.arange(n), n, (7, 0))
  assert sorted(order.tolist()) == list(range(n))


def test_the_order_is_a_function_of_the_key_alone():
  n = 10_000
  first = index_shuffle.permute(np.arange(n), n, (3, 1))
  np.testing.assert_array_equal(first, index_shuffle.permute(np.arange(n), n, (3, 1)))
  # One index at a time gives the same images as the whole range at once.
  np.testing.assert_array_equal(
    [index_shuffle.permute([i], n, (3, 1))[0] for i in (0, 17, 9_999)], first[[0, 17, 9_999]]
  )
  other_epoch = index_shuffle.permute(np.arange(n), n, (3, 2))
  other_seed = index_shuffle.permute(np.arange(n), n, (4, 1))
  assert np.mean(first == other_epoch) < 0.01 and np.mean(first == other_seed) < 0.01


def test_the_mixing_matches_a_random_permutation():
  n = 100_000
  order = index_shuffle.permute(np.arange(n), n, (0, 0))
  # A uniform random permutation moves an index n/3 on average and keeps
  # about one neighbour pair adjacent.
  assert abs(np.mean(np.abs(order - np.arange(n))) / n - 1 / 3) < 0.01
  assert np.sum(np.diff(order) == 1) < 10
  # Where index 0 lands, over many keys, is uniform over [0, 10) (chi-square,
  # 9 degrees of freedom: 27.9 is its 0.1 % point).
  landing = [index_shuffle.permute([0], 10, (key, 0))[0] for key in range(5_000)]
  counts = np.bincount(landing, minlength=10)
  chi_square = np.sum((counts - 500) ** 2 / 500)
  assert chi_square < 27.9, counts


def test_a_huge_domain_costs_nothing():
  n = 10**12  # a trillion windows: no permutation could be materialised
  images = index_shuffle.permute(np.arange(0, n, n // 1000), n, 11)
  assert images.min() >= 0 and images.max() < n and len(set(images.tolist())) == len(images)


def test_indices_outside_the_domain_are_refused():
  with pytest.raises(ValueError, match=r'indices must lie in \[0, 5\)'):
    index_shuffle.permute([5], 5, 0)
