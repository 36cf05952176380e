"""Files in a workdir that may be local or remote (gs://bucket/run on Cloud TPU).

Everything lmjax writes besides checkpoints (Orbax handles those) goes through
here: local paths with the os module, URLs (gs://, and any other filesystem
TensorFlow knows) through tf.io.gfile, imported only then, so the model, step,
sharding and checkpoint modules load without TensorFlow (GPU images often
lack it).
"""

import builtins
import os


def _remote(path: str) -> bool:
  return '://' in str(path)


def tensorflow():
  """TensorFlow, imported on first use: only object-store paths need it."""
  import tensorflow as tf  # noqa: PLC0415

  return tf


def _gfile():
  return tensorflow().io.gfile


def absolute(path: str) -> str:
  """Local paths made absolute; URLs (gs://...) as they are."""
  return path if _remote(path) else os.path.abspath(path)


def join(*parts: str) -> str:
  return os.path.join(*parts)


def makedirs(path: str) -> None:
  if _remote(path):
    _gfile().makedirs(path)
  else:
    os.makedirs(path, exist_ok=True)


def exists(path: str) -> bool:
  return _gfile().exists(path) if _remote(path) else os.path.exists(path)


def isdir(path: str) -> bool:
  return _gfile().isdir(path) if _remote(path) else os.path.isdir(path)


def open(path: str, mode: str = 'r'):  # noqa: A001 - mirrors the builtin
  if _remote(path):
    return _gfile().GFile(path, mode)
  return builtins.open(path, mode, encoding=None if 'b' in mode else 'utf-8')


def replace(source: str, target: str) -> None:
  """Atomic on local disks; on object stores, a copy then a delete."""
  if _remote(source) or _remote(target):
    _gfile().rename(source, target, overwrite=True)
  else:
    os.replace(source, target)


def remove(path: str) -> None:
  if _remote(path):
    _gfile().remove(path)
  else:
    os.remove(path)


def move_tree(source: str, target: str) -> None:
  """Moves a directory: a rename on local disks; on object stores (no directories),
  every object copied, then the source deleted."""
  if not _remote(source):
    os.rename(source, target)
    return
  gfile = _gfile()
  for directory, _, files in gfile.walk(source):
    relative = os.path.relpath(directory, source)
    gfile.makedirs(os.path.join(target, relative))
    for name in files:
      gfile.copy(
        os.path.join(directory, name), os.path.join(target, relative, name), overwrite=True
      )
  gfile.rmtree(source)
