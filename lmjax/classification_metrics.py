"""Exact classification metrics from labels and class probabilities, in numpy.

The definitions follow scikit-learn so results can be checked against it:
macro averages are unweighted over all `num_classes` classes (as with
`labels=range(num_classes)`), an undefined precision, recall or F1 counts as 0
(`zero_division=0`), and ROC AUC is the exact area with tied scores counted as
half a correctly ordered pair (the Mann-Whitney U statistic), which equals the
trapezoidal area under the ROC curve.
"""

import numpy as np


def classification_metrics(labels, probabilities, num_classes: int) -> dict:
  """Accuracy, macro precision/recall/F1 and ROC AUC of argmax predictions.

  Args:
    labels: int array [n] of true classes in [0, num_classes).
    probabilities: float array [n, num_classes], e.g. softmax outputs.
    num_classes: number of classes (at least 2).

  Returns:
    A dict of Python floats: `accuracy`, `precision_macro`, `recall_macro`,
    `f1_macro`, `examples`. For two classes also `precision`, `recall`, `f1`
    of class 1 and `roc_auc` (score = probabilities[:, 1]; nan when the
    labels hold a single class). For more classes `roc_auc_macro_ovr`, the
    mean one-vs-rest AUC over the classes that have both positive and
    negative labels, and `roc_auc_classes`, how many such classes there were
    (the AUC is nan when there are none).
  """
  labels, probabilities = _check_inputs(labels, probabilities, num_classes)
  predictions = np.argmax(probabilities, axis=1)

  # One bincount over (label, prediction) pairs gives the whole confusion matrix.
  confusion = np.bincount(
    labels * num_classes + predictions, minlength=num_classes * num_classes
  ).reshape(num_classes, num_classes)
  true_positives = np.diag(confusion).astype(np.float64)
  predicted = confusion.sum(axis=0).astype(np.float64)
  actual = confusion.sum(axis=1).astype(np.float64)
  precision = _safe_divide(true_positives, predicted)
  recall = _safe_divide(true_positives, actual)
  # 2TP / (2TP + FP + FN), as scikit-learn computes it, so F1 is 0 (not
  # undefined) whenever a class has no true positives.
  f1 = _safe_divide(2.0 * true_positives, predicted + actual)

  result = {
    'accuracy': float(true_positives.sum() / labels.size),
    'precision_macro': float(precision.mean()),
    'recall_macro': float(recall.mean()),
    'f1_macro': float(f1.mean()),
    'examples': float(labels.size),
  }
  if num_classes == 2:
    result['precision'] = float(precision[1])
    result['recall'] = float(recall[1])
    result['f1'] = float(f1[1])
    result['roc_auc'] = _binary_auc(labels == 1, probabilities[:, 1])
  else:
    areas = [_binary_auc(labels == c, probabilities[:, c]) for c in range(num_classes)]
    defined = [area for area in areas if not np.isnan(area)]
    result['roc_auc_macro_ovr'] = float(np.mean(defined)) if defined else float('nan')
    result['roc_auc_classes'] = float(len(defined))
  return result


def majority_baseline(labels, num_classes: int) -> float:
  """Accuracy of always predicting the most frequent class in `labels`."""
  labels = _check_labels(labels, num_classes)
  return float(np.bincount(labels, minlength=num_classes).max() / labels.size)


def _check_labels(labels, num_classes: int) -> np.ndarray:
  labels = np.asarray(labels)
  if num_classes < 2:
    raise ValueError(f'num_classes must be at least 2, got {num_classes}')
  if labels.ndim != 1 or labels.size == 0:
    raise ValueError(f'labels must be a non-empty 1-D array, got shape {labels.shape}')
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f'labels must be integers, got dtype {labels.dtype}')
  if labels.min() < 0 or labels.max() >= num_classes:
    raise ValueError(f'labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]')
  return labels.astype(np.int64)


def _check_inputs(labels, probabilities, num_classes: int):
  labels = _check_labels(labels, num_classes)
  probabilities = np.asarray(probabilities, dtype=np.float64)
  if probabilities.shape != (labels.size, num_classes):
    raise ValueError(
      f'probabilities must have shape {(labels.size, num_classes)}, got {probabilities.shape}'
    )
  if np.isnan(probabilities).any():
    raise ValueError('probabilities contain nan')
  return labels, probabilities


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
  """numerator / denominator, and 0 where the denominator is 0 (zero_division=0)."""
  return np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator > 0)


def _binary_auc(is_positive: np.ndarray, scores: np.ndarray) -> float:
  """ROC AUC of `scores` for the boolean `is_positive`, nan if it is one class.

  Counts, over all (positive, negative) pairs, those where the positive scores
  higher, plus half of those tied. Grouping equal scores keeps the sums in
  integers, so the area is exact whatever the number of ties.
  """
  positives = int(is_positive.sum())
  negatives = is_positive.size - positives
  if positives == 0 or negatives == 0:
    return float('nan')
  _, group = np.unique(scores, return_inverse=True)
  group = group.reshape(-1)  # numpy 2.0.x shapes the inverse like the input
  num_groups = int(group.max()) + 1
  positives_in_group = np.bincount(group[is_positive], minlength=num_groups)
  negatives_in_group = np.bincount(group[~is_positive], minlength=num_groups)
  # Groups are in increasing score order, so this counts negatives strictly below.
  negatives_below = np.cumsum(negatives_in_group) - negatives_in_group
  twice_ordered_pairs = 2 * np.dot(positives_in_group, negatives_below) + np.dot(
    positives_in_group, negatives_in_group
  )
  return float(twice_ordered_pairs / (2.0 * positives * negatives))
