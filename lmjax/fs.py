"""Files in a workdir that may be local or remote (gs://bucket/run on Cloud TPU).

Everything lmjax writes besides checkpoints (Orbax handles those) goes through
tf.io.gfile, which reads and writes local paths and gs:// alike.
"""

import os

import tensorflow as tf


def absolute(path: str) -> str:
  """Local paths made absolute; URLs (gs://...) as they are."""
  return path if '://' in path else os.path.abspath(path)


def join(*parts: str) -> str:
  return os.path.join(*parts)


def makedirs(path: str) -> None:
  tf.io.gfile.makedirs(path)


def exists(path: str) -> bool:
  return tf.io.gfile.exists(path)


def isdir(path: str) -> bool:
  return tf.io.gfile.isdir(path)


def open(path: str, mode: str = 'r'):  # noqa: A001 - mirrors the builtin
  return tf.io.gfile.GFile(path, mode)


def replace(source: str, target: str) -> None:
  """Atomic on local disks; on object stores, a copy then a delete."""
  tf.io.gfile.rename(source, target, overwrite=True)


def move_tree(source: str, target: str) -> None:
  """Moves a directory: a rename on local disks; on object stores (no directories),
  every object copied, then the source deleted."""
  if '://' not in source:
    os.rename(source, target)
    return
  for directory, _, files in tf.io.gfile.walk(source):
    relative = os.path.relpath(directory, source)
    tf.io.gfile.makedirs(os.path.join(target, relative))
    for name in files:
      tf.io.gfile.copy(
        os.path.join(directory, name), os.path.join(target, relative, name), overwrite=True
      )
  tf.io.gfile.rmtree(source)
