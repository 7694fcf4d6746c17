"""What an output path may hold before a run writes there, and what `output.overwrite` may replace.

An output folder is absent, empty, one single checkpoint (a PyTree checkpoint, or a folder of
safetensors files), or an export directory: step folders (by Orbax's step names) holding checkpoints, beside what runs of the job and Orbax's own
saves leave there. Anything else is the user's: no run writes into it or replaces it, whatever
`output.overwrite` says, and no run writes through or replaces a symbolic link.
"""

import os

import orbax.checkpoint as ocp

from surgery_job import checkpoint, lock, paths
from surgery_job.checkpoint import CHECKPOINT_METADATA, COMMIT_FILE
from surgery_job.formats import safetensors_file

# Beside the steps: Orbax's saves in progress (the job's staging and -deleting folders carry the
# same mark, so readers skip them too), and a CheckpointManager's root metadata folder.
_TEMPORARY = '.orbax-checkpoint-tmp'
_ROOT_METADATA = 'metadata'
RECORD = 'surgery_exported_steps.json'  # The steps an export directory has held (`output.py`).


def is_checkpoint(folder: paths.Path) -> bool:
  """A single PyTree checkpoint (or a step's PyTree item), or a folder of safetensors files."""
  return paths.is_file(folder / '_METADATA') or _holds_safetensors(paths.listing(folder))


def _holds_safetensors(entries: dict) -> bool:
  return any(name.endswith('.safetensors') or name == safetensors_file.INDEX for name in entries)


def _left_beside_steps(name: str) -> bool:
  """Whether `name`, in an export directory, is a lock, a staging or `-deleting` folder, an Orbax
  save in progress, Orbax's root metadata or the job's record of exported steps."""
  return lock.SUFFIX in name or _TEMPORARY in name or name in (_ROOT_METADATA, RECORD)


def is_step(folder: paths.Path) -> bool:
  """Whether `folder` is a step of an export directory: an Orbax step name, and a finished step's
  metadata or commit file or a PyTree item in it. On an object store, a step folder without its
  commit file is a save in progress, which readers skip (Orbax's, or a commit that the job's next
  run finishes): it counts too."""
  if checkpoint.step_of(folder.name) is None:
    return False
  if paths.on_object_store(folder):
    return True
  entries = paths.listing(folder)
  if CHECKPOINT_METADATA in entries or COMMIT_FILE in entries or _holds_safetensors(entries):
    return True
  return any(is_dir and is_checkpoint(folder / name) for name, (is_dir, _) in entries.items())


def foreign(root: paths.Path) -> list[str]:
  """What the folder `root` holds that is neither a step nor left beside the steps, sorted."""
  return sorted(name for name, (is_dir, _) in paths.listing(root).items()
                if not _left_beside_steps(name) and not (is_dir and is_step(root / name)))


def _not_checkpoints(names: list[str]) -> str:
  if len(names) == 1:
    return f'{names[0]}, which is not a checkpoint'
  more = f' and {len(names) - 3} more' if len(names) > 3 else ''
  return f'{", ".join(names[:3])}{more}, which are not checkpoints'


def export_directory_refusal(root: paths.Path) -> str | None:
  """Why the export directory `root` may not take a step (before the run writes anything there)."""
  found = foreign(root)
  if found:
    return (f'output.path {root} holds {_not_checkpoints(found)}; an output folder must be '
            'absent, empty, a checkpoint or a directory of checkpoint steps')
  return None


def link_refusal(unit: paths.Path, label: str) -> str | None:
  """Why a run may not write at `unit` when it is a symbolic link. `label` names it."""
  if paths.is_link(unit):
    return (f'{label} is a symbolic link to {os.readlink(unit)}; the job neither writes through a '
            'link nor replaces one: remove it, or point output.path at where it leads')
  return None


def unit_refusal(unit: paths.Path, label: str, single: bool) -> str | None:
  """Why a run may not replace what is at `unit` (its output checkpoint: a single one, or a step of
  an export directory), with overwrite or without; None where it may. `label` names it."""
  if not paths.listing(unit):
    return None
  if single:
    if is_checkpoint(unit):
      return None
    found = foreign(unit)
    if found:
      return (f'{label} holds {_not_checkpoints(found)}; an output folder must be absent, '
              'empty or a checkpoint')
    steps = sorted((name for name, (is_dir, _) in paths.listing(unit).items()
                    if is_dir and is_step(unit / name)), key=ocp.path.step.step_from_checkpoint_name)
    return (f'{label} is a CheckpointManager directory (steps {", ".join(steps) or "none yet"}); a '
            'single PyTree checkpoint never replaces it, with output.overwrite or without: choose '
            'another output.path')
  if is_step(unit):
    return None
  return f'{label} is not a checkpoint; the job replaces only a checkpoint step'
