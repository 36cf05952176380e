"""Telling a storage failure (permissions, network, a full disk) from damaged data.

A reader that finds a checkpoint step unreadable must know which it is: damage
(a missing or corrupt file) means an older step is the best there is; a
storage failure means the newest step may be fine and the storage must be
fixed (or the read retried). TensorStore, TensorFlow and the OS each say so
in their own words; these functions read all three.
"""

import errno
import re

# Words of storage failures (not damage) in TensorStore's, TensorFlow's and the OS's
# messages. NOT_FOUND and DATA_LOSS are damage: the step is incomplete or corrupt.
_IO_WORDS = (
  'PERMISSION_DENIED',
  'Permission denied',
  'UNAVAILABLE',
  'DEADLINE_EXCEEDED',
  'RESOURCE_EXHAUSTED',
  'No space left',
  'Input/output error',
  'Connection reset',
  'timed out',
  'UNAUTHENTICATED',
)
_IO_ERRNOS = (
  errno.EACCES,
  errno.EPERM,
  errno.EIO,
  errno.ENOSPC,
  errno.ETIMEDOUT,
  errno.ECONNRESET,
  errno.EDQUOT,
  errno.EROFS,
)


def chain(error):
  """`error`, then what it was raised from, and so on."""
  while error is not None:
    yield error
    error = error.__cause__ or error.__context__


def is_io_failure(error: BaseException) -> bool:
  """Whether `error` (or one it came from) is the storage failing rather than a
  missing or corrupt file."""
  for link in chain(error):
    if isinstance(link, (PermissionError, TimeoutError, ConnectionError)):
      return True
    if isinstance(link, OSError) and link.errno in _IO_ERRNOS:
      return True
    if any(word in str(link) for word in _IO_WORDS):
      return True
  return False


def is_disk_full(error: BaseException) -> bool:
  return any(
    (isinstance(link, OSError) and link.errno in (errno.ENOSPC, errno.EDQUOT))
    or 'RESOURCE_EXHAUSTED' in str(link)
    or 'No space left' in str(link)
    for link in chain(error)
  )


_STATUS = re.compile(r'\b[A-Z]+(?:_[A-Z]+)*: ')  # 'PERMISSION_DENIED: ...' (absl status codes)


def brief(error: BaseException, limit: int = 240) -> str:
  """One line for `error`: the most telling message of its chain (the first with an
  absl status code such as PERMISSION_DENIED, else the root cause), without the
  TensorStore spec (hundreds of lines) and source locations it appends."""
  links = list(chain(error))
  chosen = next((link for link in links if _STATUS.search(str(link))), links[-1])
  text = str(chosen)
  for marker in (' [tensorstore_spec=', ' [source locations=', ' See full TensorStore', '\n'):
    text = text.split(marker)[0]
  text = text.strip() or type(chosen).__name__
  return f'{type(chosen).__name__}: {text[:limit]}{"..." if len(text) > limit else ""}'
