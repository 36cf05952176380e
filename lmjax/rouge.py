"""ROUGE for text-to-text evaluation, by Google's `rouge-score` package.

`scores(predictions, references)` gives ROUGE-1, ROUGE-2, ROUGE-L and
ROUGE-Lsum F-measures, each the mean over the examples (exact, no bootstrap),
in [0, 1], with the Porter stemmer as in the summarization literature.
ROUGE-Lsum is the summary-level LCS over sentences: rouge-score reads them as
newline-separated lines, so both sides are first cut into sentences
(`sentences`: after ., ! or ? and a space, and at line breaks). `lead(text, 3)`
is the lead-3 baseline of news summarization: a document's first three sentences.
"""

import re
from collections.abc import Sequence

from rouge_score import rouge_scorer

KEYS = ('rouge1', 'rouge2', 'rougeL', 'rougeLsum')
_SENTENCE_END = re.compile(r'(?<=[.!?])\s+|\n+')


def sentences(text: str) -> list[str]:
  """`text` cut after sentence-ending punctuation followed by space, and at line breaks."""
  return [s.strip() for s in _SENTENCE_END.split(text.strip()) if s.strip()]


def lead(text: str, count: int = 3) -> str:
  """The first `count` sentences of `text`, one per line."""
  return '\n'.join(sentences(text)[:count])


def scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
  """Mean F-measure of each ROUGE variant over aligned (prediction, reference) pairs."""
  if len(predictions) != len(references):
    raise ValueError(
      f'ROUGE needs one prediction per reference: got {len(predictions)} predictions '
      f'for {len(references)} references'
    )
  if not references:
    raise ValueError('ROUGE of no examples: the evaluation produced no outputs')
  scorer = rouge_scorer.RougeScorer(list(KEYS), use_stemmer=True)
  totals = dict.fromkeys(KEYS, 0.0)
  for prediction, reference in zip(predictions, references):
    lines = lambda text: '\n'.join(sentences(text))
    result = scorer.score(lines(reference), lines(prediction))  # (target, prediction)
    for key in KEYS:
      totals[key] += result[key].fmeasure
  return {key: totals[key] / len(references) for key in KEYS}
