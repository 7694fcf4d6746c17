"""Keeping host memory what the arrays need: glibc holds on to freed memory unless told not to;
and refusing, before any allocation, a surgery whose arrays cannot fit in the host's memory.

glibc gives busy threads arenas of their own, and memory freed in one arena is neither reused by
the others nor returned to the OS: a streamed run's RSS would creep up group after group.
"""

import contextlib
import ctypes
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from surgery_job.errors import SurgeryError

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


def host_memory_bytes() -> int:
  """This host's memory: its RAM, or its container's limit (cgroup v2 or v1) when lower."""
  total = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
  for limit in ('/sys/fs/cgroup/memory.max', '/sys/fs/cgroup/memory/memory.limit_in_bytes'):
    with contextlib.suppress(OSError, ValueError):  # 'max': no limit.
      total = min(total, int(Path(limit).read_text()))
  return total


def check_fits(groups: Sequence[Any], outputs: Mapping[str, Any], budget_gb: float | None) -> None:
  """Refuses, before anything is allocated, a group whose arrays (`host_bytes`: inputs read and
  outputs written, every shard on this host) exceed the host's memory: a huge `add` or `pad` would
  otherwise end in the kernel's OOM killer."""
  available = host_memory_bytes()
  for group in groups:
    if group.host_bytes > available:
      largest = max(group.outputs, key=lambda k: outputs[k].nbytes)
      leaf = outputs[largest]
      hint = ('; set memory.host_budget_gb to stream it in groups'
              if budget_gb is None and len(group.outputs) > 1 and leaf.nbytes < available else '')
      raise SurgeryError(
          f'the surgery needs {group.host_bytes / 1e9:.2f} GB of arrays at once on this host (each '
          f"local device's shard counted), more than its {available / 1e9:.2f} GB of memory "
          f'(largest output: {largest!r} {leaf.shape} {leaf.dtype.name}, '
          f'{leaf.nbytes / 1e9:.2f} GB){hint}')
