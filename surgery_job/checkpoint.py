"""Orbax I/O: find the input, read its metadata, restore what is needed, write and re-read the output."""

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.experimental.v1 import partial

from surgery_job import faults, tree
from surgery_job.errors import SurgeryError


PARTIAL_ITEM = 'state'
CHECKPOINT_METADATA = '_CHECKPOINT_METADATA'
V1_MARKER = 'orbax.checkpoint'
COMMIT_FILE = 'commit_success.txt'
STANDARD_HANDLER = (f'{ocp.StandardCheckpointHandler.__module__}.'
                    f'{ocp.StandardCheckpointHandler.__qualname__}')


@dataclasses.dataclass(frozen=True)
class Location:
  """One checkpoint item: a single PyTree checkpoint, or one item of a CheckpointManager step."""
  root: Path
  step: int | None  # None: a single PyTree checkpoint, not a CheckpointManager directory.
  item: str | None

  @property
  def item_dir(self) -> Path:
    return self.root if self.step is None else self.root / str(self.step) / self.item


def _is_pytree(path: Path) -> bool:
  return (path / '_METADATA').is_file()


def locate(path: str, step: Any, item: str | None) -> Location:
  """The input item named by `input.path`, `input.step` and `input.item`."""
  root = Path(path).absolute()
  if not root.exists():
    raise SurgeryError(f'input.path {root} does not exist')
  if _is_pytree(root):
    if isinstance(step, int):
      raise SurgeryError(f'input.step is {step} but {root} is a single PyTree checkpoint')
    return Location(root, None, None)
  steps = committed_steps(root)
  if not steps:
    raise SurgeryError(f'input.path {root} is not an Orbax checkpoint: no _METADATA file and '
                       'no numbered step folders')
  if step is None or step == 'latest':
    step = steps[-1]
  elif step not in steps:
    raise SurgeryError(f'input.step {step} not found in {root} (steps: {steps})')
  items = sorted(p.name for p in (root / str(step)).iterdir() if _is_pytree(p))
  if item is None:
    if len(items) != 1:
      raise SurgeryError(f'set input.item: step {step} of {root} holds items {items}')
    item = items[0]
  elif item not in items:
    raise SurgeryError(f'input.item {item!r} not found in step {step} of {root} (items: {items})')
  return Location(root, step, item)


def committed_steps(root: Path) -> list[int]:
  """The steps of a CheckpointManager directory that a reader may take: numbered step folders
  holding a PyTree item, never Orbax's temporary folders of a save in progress."""
  return sorted(int(p.name) for p in root.iterdir()
                if p.name.isdigit() and p.is_dir() and any(_is_pytree(i) for i in p.iterdir()))


def select_steps(path: str, step: Any, exported: Callable[[int], bool]) -> list[int | None]:
  """The steps `input.step` names, oldest first: one spec for `locate` for each step to convert.
  `exported(step)`: whether the output already has that step ('new' leaves those out)."""
  if not isinstance(step, (list, tuple)) and step not in ('all', 'new'):
    return [step]
  root = Path(path).absolute()
  if not root.exists() or _is_pytree(root):
    raise SurgeryError(f'input.step={step!r} needs a CheckpointManager directory at input.path {root}')
  committed = committed_steps(root)
  if step == 'all':
    return committed
  if step == 'new':
    return [s for s in committed if not exported(s)]
  missing = sorted(set(step) - set(committed))
  if missing:
    raise SurgeryError(f'input.step {missing[0]} not found in {root} (committed steps: {committed})')
  return sorted(set(step))


def read_metadata(location: Location) -> Any:
  """The item's tree of ArrayMetadata (shape, dtype, saved sharding), read without array data."""
  try:
    return ocp.PyTreeCheckpointHandler().metadata(location.item_dir).tree
  except Exception as e:  # Orbax and tensorstore raise many kinds for a damaged checkpoint.
    raise SurgeryError(read_error(e, location.item_dir)) from None


def read_error(error: Exception, item_dir: Path) -> str:
  """One line naming the damaged or missing file of the checkpoint at `item_dir`."""
  text = str(error)
  files = re.findall(r'local file "([^"]+)"', text)
  if isinstance(error, json.JSONDecodeError):
    return f'damaged checkpoint metadata file {item_dir / "_METADATA"}: {error}'
  if files:
    path = Path(files[-1])
    state = 'is missing' if not path.exists() else 'cannot be read'
    return f'checkpoint file {path} {state} ({text.split(":", 1)[0]})'
  return f'cannot read the checkpoint in {item_dir}: {text.splitlines()[0] if text else type(error).__name__}'


def restore(item_dir: Path, skeleton: Any, targets: dict[str, jax.ShapeDtypeStruct]) -> dict[str, jax.Array]:
  """Reads only the `targets` leaves, each onto its sharding; the others stay on disk."""
  flat_skeleton = tree.flatten(skeleton)
  item = tree.unflatten({k: targets.get(k, ocp.PLACEHOLDER) for k in flat_skeleton}, skeleton)
  restore_args = jax.tree.map(
      lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype)
      if isinstance(x, jax.ShapeDtypeStruct) else ocp.RestoreArgs(), item)
  with ocp.PyTreeCheckpointer() as checkpointer:
    restored = checkpointer.restore(item_dir, args=ocp.args.PyTreeRestore(
        item=item, restore_args=restore_args))
  return {k: v for k, v in tree.flatten(restored).items() if k in targets}


def step_metadata(location: Location) -> dict:
  """The input step's `_CHECKPOINT_METADATA` (item handlers, custom metadata); {} for none."""
  if location.step is None:
    return {}
  try:
    metadata = json.loads((location.root / str(location.step) / CHECKPOINT_METADATA).read_text())
  except (OSError, ValueError):
    return {}
  return metadata if isinstance(metadata, dict) else {}


class Writer:
  """Writes the output group by group with Orbax partial saves into `unit_dir`, then finalizes it
  into one ordinary checkpoint: a step folder holding `item`, or (item None) a PyTree checkpoint.
  A step keeps the input step's handler name for the item and its custom metadata, updated with
  `custom_metadata`."""

  def __init__(self, unit_dir: Path, item: str | None, barrier: Callable[[str], None],
               source_step: dict | None = None, custom_metadata: dict | None = None):
    self.unit_dir, self.item, self.barrier = unit_dir, item, barrier
    self.source_step, self.custom_metadata = source_step or {}, custom_metadata or {}
    # Partial saves write an item folder named `state` under the path they are given.
    self.partial = unit_dir if item is not None else unit_dir.with_name(unit_dir.name + '.partial')

  @property
  def _saves_dir(self) -> Path:
    """Where Orbax keeps each partial save, one folder per save, until `finish` merges them."""
    return self.partial.with_name(self.partial.name + '.partial_save')

  def saves(self) -> set[str]:
    """The partial saves that finished (Orbax wrote their commit file)."""
    if not self._saves_dir.is_dir():
      return set()
    return {p.name for p in self._saves_dir.iterdir() if (p / COMMIT_FILE).is_file()}

  def keep_only(self, names: set[str]) -> None:
    """Deletes every partial save not in `names` (process 0): those of groups written again."""
    if self._saves_dir.is_dir():
      for save in self._saves_dir.iterdir():
        if save.name not in names:
          shutil.rmtree(save)

  def write(self, nested: Any) -> None:
    partial.save(self.partial, nested)
    faults.at('writing')

  def finish(self) -> Path:
    """Finalizes the partial saves (every process); returns the item folder written."""
    partial.finalize(self.partial)
    self.barrier('finalized')
    if jax.process_index() == 0:
      if self.item is None:
        (self.partial / PARTIAL_ITEM).rename(self.unit_dir)
        shutil.rmtree(self.partial)
      else:
        (self.partial / PARTIAL_ITEM).rename(self.partial / self.item)
        # The v1 API's marker makes a plain CheckpointManager.restore(step) refuse the step.
        (self.partial / V1_MARKER).unlink(missing_ok=True)
        self._write_step_metadata()
    self.barrier('laid_out')
    return self.unit_dir if self.item is None else self.unit_dir / self.item

  def _write_step_metadata(self) -> None:
    """Names the item's handler as the input step did (else Orbax's standard one), as
    CheckpointManager does, and carries the step's custom metadata over."""
    path = self.partial / CHECKPOINT_METADATA
    metadata = json.loads(path.read_text())
    handlers = self.source_step.get('item_handlers')
    handler = handlers.get(self.item) if isinstance(handlers, dict) else None
    metadata['item_handlers'] = {self.item: handler if isinstance(handler, str) else STANDARD_HANDLER}
    custom = self.source_step.get('custom_metadata')
    metadata['custom_metadata'] = {**(custom if isinstance(custom, dict) else {}),
                                   **self.custom_metadata}
    path.write_text(json.dumps(metadata))


def inside(path: Path, parent: Path) -> bool:
  path, parent = Path(os.path.realpath(path)), Path(os.path.realpath(parent))
  return path == parent or parent in path.parents
