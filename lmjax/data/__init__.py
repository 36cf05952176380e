"""Corpora, tokenizers and the tf.data input pipeline."""

import importlib.util
import sys
import types


def lazy(name: str) -> types.ModuleType:
  """The module `name` (e.g. 'lmjax.data.pipeline'), executed on its first
  attribute access rather than now (importlib.util.LazyLoader). The task layer
  names the data layer this way, so that building a model, compiling a step or
  benchmarking synthetic batches imports no TensorFlow: GPU images often lack it."""
  if name in sys.modules:
    return sys.modules[name]
  spec = importlib.util.find_spec(name)
  loader = importlib.util.LazyLoader(spec.loader)
  spec.loader = loader
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  loader.exec_module(module)
  return module
