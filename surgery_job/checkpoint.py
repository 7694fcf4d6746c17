"""Orbax I/O: find the input, read its metadata, restore what is needed, write and re-read the output."""

import contextlib
import dataclasses
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint.experimental.v1 import partial

from surgery_job import faults, storage, tree
from surgery_job.errors import SurgeryError


PARTIAL_ITEM = 'state'
CHECKPOINT_METADATA = '_CHECKPOINT_METADATA'
V1_MARKER = 'orbax.checkpoint'
COMMIT_FILE = ocp.path.atomicity.COMMIT_SUCCESS_FILE
STANDARD_HANDLER = (f'{ocp.StandardCheckpointHandler.__module__}.'
                    f'{ocp.StandardCheckpointHandler.__qualname__}')


@dataclasses.dataclass(frozen=True)
class Location:
  """One checkpoint item: a single PyTree checkpoint, or one item of a CheckpointManager step."""
  root: Path
  step: int | None  # None: a single PyTree checkpoint, not a CheckpointManager directory.
  item: str | None
  step_folder: str | None = None  # The step's folder name when it is not str(step): `0003`.

  @property
  def item_dir(self) -> Path:
    return self.root if self.step is None else self.root / (self.step_folder or str(self.step)) / self.item


def _is_pytree(path: Path) -> bool:
  return (path / '_METADATA').is_file()


def _items(step_dir: Path) -> list[str]:
  return sorted(p.name for p in step_dir.iterdir() if _is_pytree(p))


def _step_folders(root: Path) -> dict[int, list[Path]]:
  """Step number -> the folders Orbax would name for it: `3`, `0003`, `step_3`, temporaries."""
  folders = {}
  for path in root.iterdir():
    if path.is_dir():
      with contextlib.suppress(ValueError):
        folders.setdefault(ocp.path.step.step_from_checkpoint_name(path.name), []).append(path)
  return folders


def _uncommitted(step_dir: Path, commit_files: bool) -> str | None:
  """Why `step_dir` is not a finished save, or None when it is. `commit_files`: the directory's
  saves mark themselves finished with commit_success.txt, as Orbax's do."""
  if not ocp.path.step.is_path_finalized(step_dir):
    return 'is an unfinished Orbax save (a temporary folder)'
  if not _items(step_dir):
    return 'holds no checkpoint item (no folder with a _METADATA file)'
  if commit_files and not (step_dir / COMMIT_FILE).is_file():
    return f'has no {COMMIT_FILE} (an unfinished save)'
  return None


def locate(path: str, step: Any, item: str | None) -> Location:
  """The input item named by `input.path`, `input.step` and `input.item`; 'latest' is the latest
  committed step."""
  root = Path(path).absolute()
  if not root.exists():
    raise SurgeryError(f'input.path {root} does not exist')
  if not root.is_dir():
    raise SurgeryError(f'input.path {root} is a file, not a checkpoint folder')
  if _is_pytree(root):
    if isinstance(step, int):
      raise SurgeryError(f'input.step is {step} but {root} is a single PyTree checkpoint')
    return Location(root, None, None)
  committed, skipped = _scan_steps(root)
  if not committed and not skipped:
    raise SurgeryError(f'input.path {root} is not an Orbax checkpoint: no _METADATA file and '
                       'no numbered step folders')
  if step is None or step == 'latest':
    if not committed:
      raise SurgeryError(f'input.path {root} holds no committed step: {skipped[max(skipped)]}')
    step = max(committed)
    for number in sorted(n for n in skipped if n > step and jax.process_index() == 0):
      logging.warning('Skipping step %d: %s.', number, skipped[number])
  elif step in skipped:
    raise SurgeryError(f'input.step {step} is not a committed checkpoint: {skipped[step]}')
  elif step not in committed:
    raise SurgeryError(f'input.step {step} not found in {root} (steps: {sorted(committed)})')
  step_dir = committed[step]
  items = _items(step_dir)
  if item is None:
    if len(items) != 1:
      raise SurgeryError(f'set input.item: step {step} of {root} holds items {items}')
    item = items[0]
  elif item not in items:
    raise SurgeryError(f'input.item {item!r} not found in step {step} of {root} (items: {items})')
  return Location(root, step, item, step_dir.name)


def _scan_steps(root: Path) -> tuple[dict[int, Path], dict[int, str]]:
  """({committed step: its folder}, {other step: why it is not committed}) of a CheckpointManager
  directory."""
  folders = _step_folders(root)
  commit_files = any((p / COMMIT_FILE).is_file() for paths in folders.values() for p in paths)
  committed, skipped = {}, {}
  for number, paths in folders.items():
    done = [p for p in paths if _uncommitted(p, commit_files) is None]
    if len(done) > 1:
      raise SurgeryError(f'step {number} of {root} has several folders: '
                         f'{", ".join(sorted(p.name for p in done))}')
    if done:
      committed[number] = done[0]
    else:
      skipped[number] = f'{paths[0]} {_uncommitted(paths[0], commit_files)}'
  return committed, skipped


def committed_steps(root: Path) -> list[int]:
  """The steps of a CheckpointManager directory that a reader may take, oldest first: finished
  saves holding a PyTree item (see `_uncommitted`)."""
  return sorted(_scan_steps(root)[0])


def select_steps(path: str, step: Any, exported: Callable[[int], bool]) -> list[int | None]:
  """The steps `input.step` names, oldest first: one spec for `locate` for each step to convert.
  `exported(step)`: whether the output already has that step ('new' leaves those out)."""
  if not isinstance(step, (list, tuple)) and step not in ('all', 'new'):
    return [step]
  root = Path(path).absolute()
  if not root.is_dir() or _is_pytree(root):
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
  """The item's tree of ArrayMetadata (shape, dtype, saved sharding), read without array data and
  checked against the arrays the item stores."""
  try:
    metadata = ocp.PyTreeCheckpointHandler().metadata(location.item_dir).tree
    stored = storage.array_names(location.item_dir)
    damage = storage.damaged_file(location.item_dir)
  except Exception as e:  # Orbax and tensorstore raise many kinds for a damaged checkpoint.
    raise SurgeryError(read_error(e, location.item_dir)) from None
  if damage:
    raise SurgeryError(damage)
  _check_leaves(tree.flatten(metadata), stored, location.item_dir)
  return metadata


def _check_leaves(flat_metadata: dict[str, Any], stored: set[str], item_dir: Path) -> None:
  """Every leaf is an array, and `_METADATA` lists exactly the arrays stored: an entry lost from it
  would otherwise drop that leaf from the output without a word."""
  for key, leaf in flat_metadata.items():
    if getattr(leaf, 'shape', None) is None or getattr(leaf, 'dtype', None) is None:
      raise SurgeryError(f'leaf {key!r} of {item_dir} is a {type(leaf).__name__}, not an array; '
                         'the job handles array leaves only')
  listed = {storage.name(key) for key in flat_metadata}
  unlisted = sorted(stored - listed)
  if unlisted:
    raise SurgeryError(f'damaged checkpoint metadata file {item_dir / "_METADATA"}: it does not list '
                       f'the stored array {unlisted[0]!r}')
  missing = sorted(listed - stored)
  if missing:
    raise SurgeryError(f'damaged checkpoint {item_dir}: _METADATA lists {missing[0]!r} but no array '
                       'of that name is stored')


_OCDBT_READ = re.compile(r'Error reading "([^"]+)" in OCDBT database at local file "([^"]+)": ?(.*)')


def _causes(error: BaseException) -> list[BaseException]:
  """`error` and the exceptions it was raised from (Orbax wraps tensorstore's)."""
  chain = []
  while error is not None and error not in chain:
    chain.append(error)
    error = error.__cause__ or error.__context__
  return chain


def _first_line(text: str) -> str:
  # Orbax appends a TensorStore spec (`See full TensorStore details: <bound method ...>`).
  return text.split('See full TensorStore details')[0].strip().splitlines()[0] if text.strip() else ''


def read_error(error: Exception, item_dir: Path) -> str:
  """One line naming the damaged or missing file of the checkpoint at `item_dir`."""
  causes = _causes(error)
  if any(isinstance(e, json.JSONDecodeError) for e in causes):
    return f'damaged checkpoint metadata file {item_dir / "_METADATA"}: {error}'
  texts = [str(e) for e in causes]
  for text in texts:
    found = _OCDBT_READ.search(text)
    if found:
      return _value_error(found.group(1), Path(found.group(2)), _first_line(found.group(3)))
  for text in texts:
    files = re.findall(r'local file "([^"]+)"', text)
    if files:
      path = Path(files[-1])
      state = 'is missing' if not path.exists() else 'cannot be read'
      return f'checkpoint file {path} {state} ({text.split(":", 1)[0]})'
  reason = next((line for line in map(_first_line, reversed(texts)) if line), type(error).__name__)
  return f'cannot read the checkpoint in {item_dir}: {reason}'


def _value_error(key: str, database: Path, detail: str) -> str:
  """Names the data file holding the value `key` that tensorstore could not read (corrupt bytes:
  a missing or short file is found before any data moves)."""
  array = key.rsplit('/', 1)[0]
  try:
    path = next((p for k, p, _ in storage.stored_values(database) if k == key), None)
  except Exception:  # pylint: disable=broad-except
    path = None  # The database itself is damaged: name what is known.
  if path is None:
    return f'cannot read array {array!r} of the checkpoint in {database}: {detail}'
  if not path.exists():
    return f'checkpoint file {path} is missing (it holds array {array!r})'
  return f'checkpoint file {path} is damaged (it holds array {array!r}: {detail})'


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


class Writer:
  """Writes the output group by group with Orbax partial saves into `unit_dir`, then finalizes it
  into one ordinary checkpoint: a step folder holding `item`, or (item None) a PyTree checkpoint."""

  def __init__(self, unit_dir: Path, item: str | None, barrier: Callable[[str], None]):
    self.unit_dir, self.item, self.barrier = unit_dir, item, barrier
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
        self._name_item_handler()
    self.barrier('laid_out')
    return self.unit_dir if self.item is None else self.unit_dir / self.item

  def _name_item_handler(self) -> None:
    """Records the item under its own name and Orbax's standard handler, as CheckpointManager does."""
    path = self.partial / CHECKPOINT_METADATA
    metadata = json.loads(path.read_text())
    metadata['item_handlers'] = {self.item: STANDARD_HANDLER}
    path.write_text(json.dumps(metadata))


def inside(path: Path, parent: Path) -> bool:
  path, parent = Path(os.path.realpath(path)), Path(os.path.realpath(parent))
  return path == parent or parent in path.parents
