"""Keeping host memory what the arrays need: glibc holds on to freed memory unless told not to.

glibc gives busy threads arenas of their own, and memory freed in one arena is neither reused by
the others nor returned to the OS: a streamed run's RSS would creep up group after group.
"""

import contextlib
import ctypes

_M_ARENA_MAX = -8  # glibc's mallopt parameter.


def _libc():
  with contextlib.suppress(OSError):
    return ctypes.CDLL('libc.so.6')
  return None


def few_arenas() -> None:
  """Two malloc arenas, set before the runtime starts its threads (no-op without glibc)."""
  libc = _libc()
  if libc is not None and hasattr(libc, 'mallopt'):
    libc.mallopt(_M_ARENA_MAX, 2)


def release() -> None:
  """Returns memory freed by the last group to the OS (no-op without glibc)."""
  libc = _libc()
  if libc is not None and hasattr(libc, 'malloc_trim'):
    libc.malloc_trim(0)
