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
COMMIT_FILE = 'commit_success.txt'
STANDARD_HANDLER = (f'{ocp.StandardCheckpointHandler.__module__}.'
                    f'{ocp.StandardCheckpointHandler.__qualname__}')


@dataclasses.dataclass(frozen=True)
class Location:
  """What a run reads: a single PyTree checkpoint, or a step of a CheckpointManager directory with
  its PyTree items (one, or several planned together as one tree keyed by item name) and the
  items of other kinds, which are copied as they are."""
  root: Path
  step: int | None  # None: a single PyTree checkpoint, not a CheckpointManager directory.
  item: str | None  # The one PyTree item; None for a single checkpoint or several items.
  items: tuple[str, ...] = ()  # Several PyTree items, read as one tree {item: item's tree}.
  copied: tuple[str, ...] = ()  # Items of other kinds (JSON, data iterators): copied byte for byte.

  @property
  def item_dir(self) -> Path:
    """The folder read: the checkpoint, the item, or (several items) the step."""
    if self.step is None:
      return self.root
    return self.root / str(self.step) / (self.item or '')

  def trees(self) -> dict[str, Path]:
    """{key prefix: PyTree folder}: the prefix is the item name when several items are read."""
    if self.items:
      return {item: self.item_dir / item for item in self.items}
    return {'': self.item_dir}


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
  folders = sorted(p for p in (root / str(step)).iterdir() if p.is_dir())
  items = [p.name for p in folders if _is_pytree(p)]
  if item is not None:
    if item not in items:
      raise SurgeryError(f'input.item {item!r} not found in step {step} of {root} (items: {items})')
    return Location(root, step, item)
  copied = tuple(p.name for p in folders if not _is_pytree(p))
  if len(items) == 1:
    return Location(root, step, items[0], copied=copied)
  return Location(root, step, None, tuple(items), copied)


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
  """The tree of ArrayMetadata (shape, dtype, saved sharding), read without array data."""
  trees = {}
  for prefix, item_dir in location.trees().items():
    try:
      trees[prefix] = ocp.PyTreeCheckpointHandler().metadata(item_dir).tree
    except Exception as e:  # Orbax and tensorstore raise many kinds for a damaged checkpoint.
      raise SurgeryError(read_error(e, item_dir)) from None
  return trees if location.items else trees['']


def per_tree(trees: dict[str, Path], flat: dict[str, Any]) -> dict[str, dict[str, Any]]:
  """`flat` split by PyTree folder, each part keyed within its tree (without the item prefix)."""
  if '' in trees:
    return {'': flat}
  parts = {prefix: {} for prefix in trees}
  for key, value in flat.items():
    prefix, _, rest = key.partition(tree.SEP)
    parts.setdefault(prefix, {})[rest] = value
  return parts


def joined(parts: dict[str, dict[str, Any]]) -> dict[str, Any]:
  """The inverse of `per_tree`."""
  return {tree.join(prefix, key): value for prefix, part in parts.items() for key, value in part.items()}


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


def restore(trees: dict[str, Path], skeleton: Any,
            targets: dict[str, jax.ShapeDtypeStruct]) -> dict[str, jax.Array]:
  """Reads only the `targets` leaves, each onto its sharding, from the PyTree folders `trees`
  ({key prefix: folder}, as `Location.trees`); the others stay on disk."""
  parts = {}
  for prefix, wanted in per_tree(trees, targets).items():
    if wanted:
      parts[prefix] = _restore_one(trees[prefix], skeleton[prefix] if prefix else skeleton, wanted)
  return joined(parts)


def _restore_one(item_dir: Path, skeleton: Any,
                 targets: dict[str, jax.ShapeDtypeStruct]) -> dict[str, jax.Array]:
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
  """Writes the output group by group with Orbax partial saves, then finalizes it into one ordinary
  checkpoint at `unit_dir`: a single PyTree checkpoint, or a step folder holding the PyTree items
  (`location.item`, or each top-level key of the tree when `location.items`) and the copied items.
  The step keeps the input step's handler names and custom metadata (updated with
  `custom_metadata`)."""

  def __init__(self, unit_dir: Path, location: Location, barrier: Callable[[str], None],
               custom_metadata: dict | None = None):
    self.unit_dir, self.location, self.barrier = unit_dir, location, barrier
    self.custom_metadata = custom_metadata or {}

  def _partial(self, item: str | None) -> Path:
    """Where the partial saves of `item` go: Orbax puts an item folder named `state` in it."""
    return self.unit_dir.with_name(f'{self.unit_dir.name}.{item or "partial"}')

  def _items(self, nested: Any) -> dict[str | None, Any]:
    """{item: its tree} of what one group writes."""
    if self.location.step is None:
      return {None: nested}
    if self.location.items:
      return dict(nested)
    return {self.location.item: nested}

  def saves(self) -> set[str]:
    """The partial saves that finished (Orbax wrote their commit file)."""
    return {f'{folder.name}/{save.name}' for folder in self._saves_dirs() for save in folder.iterdir()
            if (save / COMMIT_FILE).is_file()}

  def _saves_dirs(self) -> list[Path]:
    # Orbax keeps each partial save in a folder of its own beside the path, until `finish` merges.
    return [p for p in self.unit_dir.parent.glob(f'{self.unit_dir.name}.*.partial_save') if p.is_dir()]

  def keep_only(self, names: set[str]) -> None:
    """Deletes every partial save not in `names` (process 0): those of groups written again."""
    for folder in self._saves_dirs():
      for save in folder.iterdir():
        if f'{folder.name}/{save.name}' not in names:
          shutil.rmtree(save)

  def write(self, nested: Any) -> None:
    for item, part in self._items(nested).items():
      partial.save(self._partial(item), part)
    faults.at('writing')

  def finish(self) -> dict[str, Path]:
    """Finalizes the partial saves (every process); returns the PyTree folders written, as
    `Location.trees` gives them."""
    # The items that got leaves, this run or an earlier one that it resumes.
    items = sorted(folder.name[len(self.unit_dir.name) + 1:-len('.partial_save')]
                   for folder in self._saves_dirs())
    if self.location.step is None:
      items = [None]
    for item in items:
      partial.finalize(self._partial(item))
    self.barrier('finalized')
    if jax.process_index() == 0:
      if self.location.step is None:
        (self._partial(None) / PARTIAL_ITEM).rename(self.unit_dir)
        shutil.rmtree(self._partial(None))
      else:
        self._lay_out_step(items)
    self.barrier('laid_out')
    if self.location.step is None:
      return {'': self.unit_dir}
    if self.location.items:
      return {item: self.unit_dir / item for item in items}
    return {'': self.unit_dir / self.location.item}

  def _lay_out_step(self, items: list[str]) -> None:
    """The step folder as CheckpointManager writes it: one folder per item, the step's metadata."""
    self.unit_dir.mkdir()
    for item in items:
      (self._partial(item) / PARTIAL_ITEM).rename(self.unit_dir / item)
    source_dir = self.location.root / str(self.location.step)
    for item in self.location.copied:
      shutil.copytree(source_dir / item, self.unit_dir / item)
    first = self._partial(items[0])
    metadata = json.loads((first / CHECKPOINT_METADATA).read_text())
    source = step_metadata(self.location)
    handlers = source.get('item_handlers') if isinstance(source.get('item_handlers'), dict) else {}
    metadata['item_handlers'] = {
        item: handlers[item] if isinstance(handlers.get(item), str) else STANDARD_HANDLER
        for item in [*items, *self.location.copied]}
    custom = source.get('custom_metadata')
    metadata['custom_metadata'] = {**(custom if isinstance(custom, dict) else {}),
                                   **self.custom_metadata}
    (self.unit_dir / CHECKPOINT_METADATA).write_text(json.dumps(metadata))
    shutil.copy(first / COMMIT_FILE, self.unit_dir / COMMIT_FILE)
    for item in items:
      shutil.rmtree(self._partial(item))


def inside(path: Path, parent: Path) -> bool:
  path, parent = Path(os.path.realpath(path)), Path(os.path.realpath(parent))
  return path == parent or parent in path.parents
