"""Orbax I/O on the read side: find the input's committed steps and items, read their metadata,
restore what is needed (the output is written by `formats/orbax.py`)."""

import dataclasses
import json
import re
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from surgery_job import paths, storage, tree
from surgery_job.errors import SurgeryError

CHECKPOINT_METADATA = '_CHECKPOINT_METADATA'
COMMIT_FILE = ocp.path.atomicity.COMMIT_SUCCESS_FILE
TMP_SUFFIX = ocp.path.atomicity.TMP_DIR_SUFFIX  # In the name of each of Orbax's temporary folders.
STANDARD_HANDLER = (f'{ocp.StandardCheckpointHandler.__module__}.'
                    f'{ocp.StandardCheckpointHandler.__qualname__}')


@dataclasses.dataclass(frozen=True)
class Location:
  """What a run reads: a single PyTree checkpoint, or a step of a CheckpointManager directory with
  its PyTree items (one, or several planned together as one tree keyed by item name) and the
  items of other kinds, which are copied as they are."""
  root: paths.Path
  step: int | None  # None: a single PyTree checkpoint, not a CheckpointManager directory.
  item: str | None  # The one PyTree item; None for a single checkpoint or several items.
  items: tuple[str, ...] = ()  # Several PyTree items, read as one tree {item: item's tree}.
  copied: tuple[str, ...] = ()  # Items of other kinds (JSON, data iterators): copied byte for byte.
  step_folder: str | None = None  # The step's folder name when it is not str(step): `0003`.

  @property
  def step_dir(self) -> paths.Path:
    return self.root / (self.step_folder or str(self.step))

  @property
  def item_dir(self) -> paths.Path:
    """The folder read: the checkpoint, the item, or (several items) the step."""
    if self.step is None:
      return self.root
    return self.step_dir / (self.item or '')

  def trees(self) -> dict[str, paths.Path]:
    """{key prefix: PyTree folder}: the prefix is the item name when several items are read."""
    if self.items:
      return {item: self.item_dir / item for item in self.items}
    return {'': self.item_dir}


def _is_pytree(path: paths.Path) -> bool:
  return paths.is_file(path / '_METADATA')


def _folders(parent: paths.Path) -> list[paths.Path]:
  return sorted(parent / name for name, (is_dir, _) in paths.listing(parent).items() if is_dir)


def _items(step_dir: paths.Path) -> list[str]:
  return [p.name for p in _folders(step_dir) if _is_pytree(p)]


def step_of(name: str) -> int | None:
  """The step of the input step folder `name`: a name one of Orbax's standard name formats gives a
  step (`3`, zero-padded `0003`, prefixed `step_3`), or Orbax's temporary folder of one
  (`3.orbax-checkpoint-tmp-1234`); None for any other name (`³`, `٣`, `notes`)."""
  final = name.split(TMP_SUFFIX, 1)[0]
  prefix, _, digits = final.rpartition('_')
  if not (digits.isascii() and digits.isdigit()):
    return None
  step = int(digits)
  padded = len(digits) if len(digits) > 1 and digits.startswith('0') else None
  name_format = ocp.path.step.standard_name_format(step_prefix=prefix or None,
                                                   step_format_fixed_length=padded)
  return step if name_format.build_name(step) == final else None


def _step_folders(root: paths.Path) -> dict[int, list[paths.Path]]:
  """Step number -> its folders (`step_of`): `3`, `0003`, `step_3`, temporaries."""
  folders = {}
  for path in _folders(root):
    step = step_of(path.name)
    if step is not None:
      folders.setdefault(step, []).append(path)
  return folders


def _uncommitted(step_dir: paths.Path, commit_files: bool) -> str | None:
  """Why `step_dir` is not a finished save, or None when it is. `commit_files`: the directory's
  saves mark themselves finished with commit_success.txt, as Orbax's do."""
  if paths.on_object_store(step_dir):
    if not (step_dir / COMMIT_FILE).exists():  # Orbax's own test there, said plainly.
      return f'has no {COMMIT_FILE} (an unfinished save)'
  elif not ocp.path.step.is_path_finalized(step_dir):
    return 'is an unfinished Orbax save (a temporary folder)'
  items = _items(step_dir)
  if not items:
    return 'holds no checkpoint item (no folder with a _METADATA file)'
  if paths.on_object_store(step_dir):  # Orbax marks each item finished there too.
    unfinished = next((item for item in items if not (step_dir / item / COMMIT_FILE).exists()), None)
    if unfinished:
      return f'item {unfinished} has no {COMMIT_FILE} (an unfinished save)'
  if commit_files and not paths.is_file(step_dir / COMMIT_FILE):
    return f'has no {COMMIT_FILE} (an unfinished save)'
  return None


def locate(path: str, step: Any, item: str | None) -> Location:
  """The input item named by `input.path`, `input.step` and `input.item`; 'latest' is the latest
  committed step."""
  root = paths.of(path, 'input.path')
  if not root.exists():
    raise SurgeryError(f'input.path {root} does not exist')
  if not root.is_dir():
    raise SurgeryError(f'input.path {root} is a file, not a checkpoint folder')
  if _is_pytree(root):
    if isinstance(step, int):
      raise SurgeryError(f'input.step is {step} but {root} is a single PyTree checkpoint')
    if paths.on_object_store(root) and not (root / COMMIT_FILE).exists():
      raise SurgeryError(f'input.path {root} is an unfinished save: it has no {COMMIT_FILE}, '
                         'which Orbax writes last on an object store')
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
  pytree = {p.name: _is_pytree(p) for p in _folders(step_dir)}
  items = [name for name, is_pytree in pytree.items() if is_pytree]
  if item is not None:
    if item not in items:
      raise SurgeryError(f'input.item {item!r} not found in step {step} of {root} (items: {items})')
    return Location(root, step, item, step_folder=step_dir.name)
  copied = tuple(name for name, is_pytree in pytree.items() if not is_pytree)
  if len(items) == 1:
    return Location(root, step, items[0], copied=copied, step_folder=step_dir.name)
  return Location(root, step, None, tuple(items), copied, step_dir.name)


def _scan_steps(root: paths.Path) -> tuple[dict[int, paths.Path], dict[int, str]]:
  """({committed step: its folder}, {other step: why it is not committed}) of a CheckpointManager
  directory."""
  folders = _step_folders(root)
  # On an object store every finished Orbax save has its commit file; elsewhere only some writers
  # put one down, and then all of that directory's finished saves have it.
  commit_files = paths.on_object_store(root) or any(
      paths.is_file(p / COMMIT_FILE) for found in folders.values() for p in found)
  committed, skipped = {}, {}
  for number, found in folders.items():
    done = [p for p in found if _uncommitted(p, commit_files) is None]
    if len(done) > 1:
      raise SurgeryError(f'step {number} of {root} has several folders: '
                         f'{", ".join(sorted(p.name for p in done))}')
    if done:
      committed[number] = done[0]
    else:
      skipped[number] = f'{found[0]} {_uncommitted(found[0], commit_files)}'
  return committed, skipped


def committed_steps(root: paths.Path) -> list[int]:
  """The steps of a CheckpointManager directory that a reader may take, oldest first: finished
  saves holding a PyTree item (see `_uncommitted`)."""
  return sorted(_scan_steps(root)[0])


def select_steps(path: str, step: Any, exported: Callable[[int], bool]) -> list[int | None]:
  """The steps `input.step` names, oldest first: one spec for `locate` for each step to convert.
  `exported(step)`: whether the output already has that step ('new' leaves those out)."""
  if not isinstance(step, (list, tuple)) and step not in ('all', 'new'):
    return [step]
  root = paths.of(path, 'input.path')
  if not root.is_dir() or _is_pytree(root):
    raise SurgeryError(f'input.step={step!r} needs a CheckpointManager directory at input.path {root}')
  return choose_steps(step, committed_steps(root), exported, root, 'committed steps')


def choose_steps(step: Any, available: list[int], exported: Callable[[int], bool], where: Any,
                 label: str) -> list[int]:
  """The steps of `available` (oldest first) that `input.step` ('all', 'new' or a list) names;
  the error for a step that is not there lists them as `label` of `where`."""
  if step == 'all':
    return available
  if step == 'new':
    return [s for s in available if not exported(s)]
  missing = sorted(set(step) - set(available))
  if missing:
    raise SurgeryError(f'input.step {missing[0]} not found in {where} ({label}: {available})')
  return sorted(set(step))


def read_metadata(location: Location) -> Any:
  """The tree of ArrayMetadata (shape, dtype, saved sharding), read without array data and checked
  against the arrays each PyTree item stores."""
  trees = {prefix: _read_tree(item_dir) for prefix, item_dir in location.trees().items()}
  return trees if location.items else trees['']


def _read_tree(item_dir: paths.Path) -> Any:
  try:
    metadata = ocp.PyTreeCheckpointHandler().metadata(item_dir).tree
    stored = storage.array_names(item_dir)
    damage = storage.damaged_file(item_dir)
  except Exception as e:  # Orbax and tensorstore raise many kinds for a damaged checkpoint.
    raise SurgeryError(read_error(e, item_dir)) from None
  if damage:
    raise SurgeryError(damage)
  _check_leaves(metadata, stored, item_dir)
  return metadata


def _check_leaves(metadata: Any, stored: set[str], item_dir: paths.Path) -> None:
  """Every leaf is an array, and `_METADATA` lists exactly the arrays stored: an entry lost from it
  would otherwise drop that leaf from the output without a word."""
  try:
    flat_metadata = tree.flatten(metadata)
  except SurgeryError as e:
    raise e.within(str(item_dir)) from None
  for key, leaf in flat_metadata.items():
    if getattr(leaf, 'shape', None) is None or getattr(leaf, 'dtype', None) is None:
      raise SurgeryError(f'leaf {key!r} of {item_dir} is a {type(leaf).__name__}, not an array; '
                         'the job handles array leaves only')
  listed = storage.names(metadata)
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
  # Orbax and tensorstore append a TensorStore spec (`See full TensorStore details: <bound method
  # ...>`, `[tensorstore_spec=...]`).
  text = re.split(r'See full TensorStore details|\[tensorstore_spec=', text)[0].strip()
  return text.splitlines()[0] if text else ''


def per_tree(trees: dict[str, paths.Path], flat: dict[str, Any]) -> dict[str, dict[str, Any]]:
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


def read_error(error: Exception, item_dir: paths.Path) -> str:
  """One line naming the damaged or missing file of the checkpoint at `item_dir`."""
  causes = _causes(error)
  if any(isinstance(e, json.JSONDecodeError) for e in causes):
    return f'damaged checkpoint metadata file {item_dir / "_METADATA"}: {error}'
  if any(isinstance(e, (KeyError, AttributeError, TypeError, RecursionError)) for e in causes):
    problem = _metadata_problem(item_dir, any(isinstance(e, RecursionError) for e in causes))
    if problem:
      return problem
  texts = [str(e) for e in causes]
  for text in texts:
    # A file tensorstore names (an OCDBT database is named by its folder, with a final '/').
    files = [f for f in re.findall(r'local file "([^"]+)"', text) if not f.endswith('/')]
    if files:
      path = paths.Path(files[-1])
      state = 'is missing' if not path.exists() else 'cannot be read'
      return f'checkpoint file {path} {state} ({text.split(":", 1)[0]})'
  for text in texts:
    found = _OCDBT_READ.search(text)
    if found:
      return _value_error(found.group(1), paths.Path(found.group(2)), _first_line(found.group(3)))
  reason = next((line for line in map(_first_line, reversed(texts)) if line), type(error).__name__)
  return f'cannot read the checkpoint in {item_dir}: {reason}'


def _metadata_problem(item_dir: paths.Path, too_deep: bool) -> str | None:
  """What in `_METADATA` Orbax's reader failed on with a bare KeyError or AttributeError (a JSON
  value of another shape) or, `too_deep`, a RecursionError (a tree deeper than it can walk); None
  if neither."""
  try:
    metadata = json.loads((item_dir / '_METADATA').read_text())
  except (OSError, ValueError):
    return None
  where = f'damaged checkpoint metadata file {item_dir / "_METADATA"}'
  if not isinstance(metadata, dict):
    return f'{where}: it holds a JSON {type(metadata).__name__}, not an object'
  entries = metadata.get('tree_metadata')
  if not isinstance(entries, dict):
    return f"{where}: it has no 'tree_metadata' object"
  depth = max((len(e.get('key_metadata') or ()) for e in entries.values() if isinstance(e, dict)),
              default=0)
  if too_deep:
    return (f'cannot read the checkpoint in {item_dir}: its tree is nested {depth} levels deep, '
            "more than Orbax's reader can take")
  return None


def _value_error(key: str, database: paths.Path, detail: str) -> str:
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


def restore(trees: dict[str, paths.Path], skeleton: Any,
            targets: dict[str, jax.ShapeDtypeStruct]) -> dict[str, jax.Array]:
  """Reads only the `targets` leaves, each onto its sharding, from the PyTree folders `trees`
  ({key prefix: folder}, as `Location.trees`); the others stay on disk."""
  parts = {}
  for prefix, wanted in per_tree(trees, targets).items():
    if wanted:
      parts[prefix] = _restore_one(trees[prefix], skeleton[prefix] if prefix else skeleton, wanted)
  return joined(parts)


WHOLE_LEAF_BYTES = 1 << 20  # A leaf up to this size is read whole by each process.


def whole_bytes(x: jax.ShapeDtypeStruct) -> int:
  """The bytes of `x` when it is read whole (0 when not), on each process, besides its shards.
  Orbax reads each shard of a sharded leaf in a task of its own: about 5 ms a leaf of 8 shards,
  against 0.6 ms for the leaf whole, then cut into its shards here. For small leaves that cost
  dominates, and reading one whole costs each process little more."""
  nbytes = x.size * x.dtype.itemsize
  small = nbytes <= WHOLE_LEAF_BYTES and not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
  return nbytes if small else 0


def _restore_one(item_dir: paths.Path, skeleton: Any,
                 targets: dict[str, jax.ShapeDtypeStruct]) -> dict[str, jax.Array]:
  flat_skeleton = tree.flatten(skeleton)
  item = tree.unflatten({k: targets.get(k, ocp.PLACEHOLDER) for k in flat_skeleton}, skeleton)
  restore_args = jax.tree.map(
      lambda x: (ocp.RestoreArgs(restore_type=np.ndarray, dtype=x.dtype) if whole_bytes(x) else
                 ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype))
      if isinstance(x, jax.ShapeDtypeStruct) else ocp.RestoreArgs(), item)
  with ocp.PyTreeCheckpointer() as checkpointer:
    restored = checkpointer.restore(item_dir, args=ocp.args.PyTreeRestore(
        item=item, restore_args=restore_args))
  return {k: jax.make_array_from_callback(v.shape, targets[k].sharding, v.__getitem__)
          if isinstance(v, np.ndarray) else v
          for k, v in tree.flatten(restored).items() if k in targets}


def step_metadata(location: Location) -> dict:
  """The input step's `_CHECKPOINT_METADATA` (item handlers, custom metadata); {} for none."""
  if location.step is None:
    return {}
  try:
    metadata = json.loads((location.step_dir / CHECKPOINT_METADATA).read_text())
  except (OSError, ValueError):
    return {}
  return metadata if isinstance(metadata, dict) else {}

