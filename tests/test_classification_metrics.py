"""Classification metrics against scikit-learn on fixed, seeded predictions."""

import math

import numpy as np
import pytest
from sklearn import metrics as sklearn_metrics

from lmjax import classification_metrics as cm

TOLERANCE = 1e-6


def softmax(logits: np.ndarray) -> np.ndarray:
  shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
  return shifted / shifted.sum(axis=1, keepdims=True)


def noisy_predictions(seed: int, n: int, num_classes: int, never_predicted=None):
  """Labels and softmax probabilities that are informative but often wrong."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, num_classes, size=n)
  logits = rng.normal(size=(n, num_classes))
  logits[np.arange(n), labels] += 1.0
  if never_predicted is not None:
    # Far below every other logit, so argmax never picks it, yet its
    # probabilities still rank examples for the one-vs-rest AUC.
    logits[:, never_predicted] -= 20.0
  return labels, softmax(logits)


def sklearn_macro(labels, predictions, num_classes):
  precision, recall, f1, _ = sklearn_metrics.precision_recall_fscore_support(
    labels, predictions, labels=list(range(num_classes)), average='macro', zero_division=0
  )
  return {'precision_macro': precision, 'recall_macro': recall, 'f1_macro': f1}


def assert_matches(result, expected):
  assert set(expected) == set(result), (sorted(expected), sorted(result))
  for key, value in expected.items():
    assert result[key] == pytest.approx(value, abs=TOLERANCE), key
    assert type(result[key]) is float, key


def test_binary_with_tied_scores_matches_sklearn():
  rng = np.random.default_rng(0)
  n = 5000
  labels = rng.integers(0, 2, size=n)
  # One decimal leaves 11 distinct scores, so nearly every pair is tied with
  # many others, and 0.5 ties the argmax (resolved to class 0).
  positive = np.round(np.clip(0.5 + 0.25 * (2 * labels - 1) + rng.normal(0, 0.25, n), 0, 1), 1)
  probabilities = np.stack([1.0 - positive, positive], axis=1)
  predictions = np.argmax(probabilities, axis=1)
  assert len(np.unique(positive)) <= 11 and (positive == 0.5).any()

  precision, recall, f1, _ = sklearn_metrics.precision_recall_fscore_support(
    labels, predictions, average='binary', zero_division=0
  )
  expected = {
    'accuracy': sklearn_metrics.accuracy_score(labels, predictions),
    **sklearn_macro(labels, predictions, 2),
    'precision': precision,
    'recall': recall,
    'f1': f1,
    'roc_auc': sklearn_metrics.roc_auc_score(labels, positive),
    'examples': n,
  }
  assert_matches(cm.classification_metrics(labels, probabilities, 2), expected)


@pytest.mark.parametrize('num_classes, never_predicted', [(3, None), (5, 3)])
def test_multiclass_matches_sklearn(num_classes, never_predicted):
  n = 4000
  labels, probabilities = noisy_predictions(num_classes, n, num_classes, never_predicted)
  predictions = np.argmax(probabilities, axis=1)
  if never_predicted is not None:
    assert not (predictions == never_predicted).any() and (labels == never_predicted).any()

  expected = {
    'accuracy': sklearn_metrics.accuracy_score(labels, predictions),
    **sklearn_macro(labels, predictions, num_classes),
    'roc_auc_macro_ovr': sklearn_metrics.roc_auc_score(
      labels, probabilities, multi_class='ovr', average='macro'
    ),
    'roc_auc_classes': num_classes,
    'examples': n,
  }
  assert_matches(cm.classification_metrics(labels, probabilities, num_classes), expected)
  # The macro F1 must also be what f1_score itself reports.
  assert cm.classification_metrics(labels, probabilities, num_classes)['f1_macro'] == pytest.approx(
    sklearn_metrics.f1_score(
      labels, predictions, labels=list(range(num_classes)), average='macro', zero_division=0
    ),
    abs=TOLERANCE,
  )


def test_multiclass_auc_skips_a_class_absent_from_labels():
  num_classes = 4
  labels, probabilities = noisy_predictions(7, 2000, num_classes)
  labels[labels == 2] = 0  # class 2 now has no positives: its AUC is undefined
  result = cm.classification_metrics(labels, probabilities, num_classes)
  present = [0, 1, 3]
  expected_auc = np.mean(
    [sklearn_metrics.roc_auc_score(labels == c, probabilities[:, c]) for c in present]
  )
  assert result['roc_auc_macro_ovr'] == pytest.approx(expected_auc, abs=TOLERANCE)
  assert result['roc_auc_classes'] == 3.0
  # Recall of the absent class counts as 0 in the macro mean, as in sklearn.
  predictions = np.argmax(probabilities, axis=1)
  assert result['recall_macro'] == pytest.approx(
    sklearn_macro(labels, predictions, num_classes)['recall_macro'], abs=TOLERANCE
  )


def test_binary_auc_is_nan_for_a_single_label_class():
  labels = np.ones(10, dtype=np.int64)
  positive = np.linspace(0.0, 1.0, 10)
  result = cm.classification_metrics(labels, np.stack([1.0 - positive, positive], axis=1), 2)
  assert math.isnan(result['roc_auc'])
  assert result['accuracy'] == pytest.approx(0.5)


def test_majority_baseline():
  labels = np.array([2, 0, 2, 1, 2, 0, 2, 2])
  assert cm.majority_baseline(labels, 4) == pytest.approx(5 / 8)
  assert cm.majority_baseline(np.zeros(3, dtype=np.int32), 2) == 1.0


def test_rejects_out_of_range_labels_and_wrong_shapes():
  with pytest.raises(ValueError, match='labels must lie'):
    cm.classification_metrics(np.array([0, 2]), np.full((2, 2), 0.5), 2)
  with pytest.raises(ValueError, match='probabilities must have shape'):
    cm.classification_metrics(np.array([0, 1]), np.full((2, 3), 1 / 3), 2)
