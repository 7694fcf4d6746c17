"""Fault injection for tests; with none of its variables set, nothing here does anything.

- `SURGERY_JOB_FAULT=POINT@PROCESS`: raise at that point on that process (`POINT` alone: on all).
- `SURGERY_JOB_PAUSE=POINT@PROCESS` and `SURGERY_JOB_PAUSE_FILE=PATH`: at that point, write PATH
  and wait while it is there, so that a test can kill the process at a known moment, or change
  what it reads and delete PATH to let it go on.
- `SURGERY_JOB_CORRUPT_OUTPUT=1`: flip a byte of each data file written (OCDBT's, or safetensors
  files), before validation.

Points: each phase's name at its start (read, mesh, plan, compile, restore, transform, write,
finalize, copy, validate, commit), `writing` while Orbax writes, `group_written` once a group's
save is on record, `copying` once a process's copied chunks are written and not yet merged,
`rename` between moving an old output aside and renaming the new one in, `renamed` just after,
`pruning` once a pruned step is out of readers' sight and not yet deleted.
"""

import os
from pathlib import Path

import jax

from surgery_job import paths, stopping

FAULT = 'SURGERY_JOB_FAULT'
PAUSE = 'SURGERY_JOB_PAUSE'
PAUSE_FILE = 'SURGERY_JOB_PAUSE_FILE'
CORRUPT_OUTPUT = 'SURGERY_JOB_CORRUPT_OUTPUT'


class InjectedFault(RuntimeError):
  pass


def _here(spec: str | None, point: str) -> bool:
  if not spec:
    return False
  name, _, process = spec.partition('@')
  return name == point and (not process or int(process) == jax.process_index())


def at(point: str) -> None:
  if _here(os.environ.get(FAULT), point):
    raise InjectedFault(f'injected fault at {point} on process {jax.process_index()}')
  if _here(os.environ.get(PAUSE), point):
    pause_file = Path(os.environ[PAUSE_FILE])
    pause_file.write_text(f'{point} {os.getpid()}')
    while pause_file.exists():
      stopping.sleep(0.1)


def corrupt_output(item_dir: paths.Path) -> None:
  """Flips a byte in the middle of every data file (OCDBT's `d/` folders, safetensors files) just
  written: which of them readers read (a process's values, or the merged tree's nodes with small
  values inline) depends on the sizes; a safetensors file's middle is in its data but for tiny
  ones."""
  if not os.environ.get(CORRUPT_OUTPUT) or jax.process_index() != 0:
    return
  for target in paths.files(item_dir):
    if target.parent.name == 'd' or target.name.endswith('.safetensors'):
      data = bytearray(target.read_bytes())
      data[len(data) // 2] ^= 0xFF
      target.write_bytes(bytes(data))
