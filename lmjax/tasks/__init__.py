"""What a run learns (`config.task`): one module per task behind one interface
(lmjax.tasks.base.Task): its data, batches, model, evaluation and baseline.

  lm        next-token prediction (lmjax.tasks.language)
  mlm       masked-token prediction with the encoder (lmjax.tasks.language)
  classify  one label per text (lmjax.tasks.classify)
  seq2seq   a target text per source text (lmjax.tasks.seq2seq)

A new task is a new module with a `Task` subclass, listed in REGISTRY below.
"""

from lmjax.tasks import base
from lmjax.tasks import classify
from lmjax.tasks import language
from lmjax.tasks import seq2seq

Task = base.Task
TaskData = base.TaskData

REGISTRY = {
  task.name: task
  for task in (language.NextToken(), language.MaskedToken(), classify.Classify(), seq2seq.Seq2Seq())
}
TASKS = tuple(REGISTRY)


def get(name: str) -> base.Task:
  """The task object of `config.task`."""
  if name not in REGISTRY:
    raise ValueError(f'task must be one of {", ".join(TASKS)}; got {name!r}')
  return REGISTRY[name]


def check(config) -> None:
  """The task, family and layout fit together (before any data is read)."""
  get(config.task).check(config)
