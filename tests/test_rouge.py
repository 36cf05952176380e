"""lmjax.rouge: ROUGE F-measures by rouge-score, checked against values worked out
by hand and against rouge-score called directly; sentence-level ROUGE-Lsum; lead-3."""

import pytest
from rouge_score import rouge_scorer

from lmjax import rouge


def test_rouge_of_worked_examples():
  # 'a b c d' against 'a b e f': 2 of 4 words (F 1/2), 1 of 3 bigrams (F 1/3), LCS 'a b' (F 1/2).
  got = rouge.scores(['a b c d'], ['a b e f'])
  assert got == pytest.approx({'rouge1': 0.5, 'rouge2': 1 / 3, 'rougeL': 0.5, 'rougeLsum': 0.5})
  assert rouge.scores(['x y z'], ['x y z']) == pytest.approx(dict.fromkeys(rouge.KEYS, 1.0))
  assert rouge.scores(['p q'], ['r s']) == pytest.approx(dict.fromkeys(rouge.KEYS, 0.0))


def test_rouge_lsum_matches_sentence_by_sentence():
  """Swapped sentences: ROUGE-L's single LCS covers one of them, ROUGE-Lsum's union
  of per-sentence LCSs both; without the sentence cut, Lsum would equal L."""
  got = rouge.scores(['three four. one two.'], ['one two. three four.'])
  assert got['rougeL'] == pytest.approx(0.5) and got['rougeLsum'] == pytest.approx(1.0)


def test_the_mean_over_examples_is_rouge_scores_own():
  predictions = [
    'The cat sat on the mat. It was happy.',
    'Stocks fell sharply on Monday',
    'a completely unrelated sentence!',
  ]
  references = [
    'A cat was sitting on the mat.\nThe cat was happy.',
    'Stocks fell on Monday after the report.',
    'The weather was fine.',
  ]
  scorer = rouge_scorer.RougeScorer(list(rouge.KEYS), use_stemmer=True)
  by_hand_lines = [
    ('A cat was sitting on the mat.\nThe cat was happy.', 'The cat sat on the mat.\nIt was happy.'),
    ('Stocks fell on Monday after the report.', 'Stocks fell sharply on Monday'),
    ('The weather was fine.', 'a completely unrelated sentence!'),
  ]
  want = {
    key: sum(scorer.score(ref, pred)[key].fmeasure for ref, pred in by_hand_lines) / 3
    for key in rouge.KEYS
  }
  assert rouge.scores(predictions, references) == pytest.approx(want, rel=1e-12)
  assert 0 < want['rouge2'] < want['rouge1'] < 1


def test_lead_takes_the_first_sentences():
  text = 'First one here. Second two!  Third three?\nFourth four. Fifth.'
  assert rouge.sentences(text) == [
    'First one here.',
    'Second two!',
    'Third three?',
    'Fourth four.',
    'Fifth.',
  ]
  assert rouge.lead(text) == 'First one here.\nSecond two!\nThird three?'
  assert rouge.lead('Only one sentence') == 'Only one sentence'


def test_misaligned_or_empty_outputs_are_clear_errors():
  with pytest.raises(ValueError, match='got 1 predictions for 2 references'):
    rouge.scores(['a'], ['a', 'b'])
  with pytest.raises(ValueError, match='no examples'):
    rouge.scores([], [])
