"""Legacy Flax checkpoints: `checkpoint_<step>` msgpack files written by `flax.training.checkpoints`
(or `flax.serialization.to_bytes`), read as the input of an ordinary run.

msgpack has no partial read: the chosen file is decoded whole into host numpy arrays once, when
its metadata is read. Each group then puts its leaves on the mesh (and lets go of them), with the
specs `partition_rules` give: the file records no sharding to carry over. The arrays held count
against the memory budget of every group (`held_bytes`).
"""

import dataclasses
import re
from typing import Any, Callable

import jax
import numpy as np
from flax import serialization
from jax.sharding import Mesh

from surgery_job import checkpoint, paths, sharding, tree
from surgery_job.errors import SurgeryError

FORMAT = 'flax_msgpack'
TITLE = 'Flax msgpack checkpoint'  # How surgery-job-inspect names it.
RECORDS_SHARDINGS = False  # Whether a leaf's saved PartitionSpec is on disk.
ITEM = 'default'  # The output's item, as a CheckpointManager names a single item.
# flax.training.checkpoints' default name, `checkpoint_{step}`: no padding, ASCII digits.
_NAME = re.compile(r'checkpoint_(0|[1-9][0-9]*)')
# The first byte of a msgpack map (fixmap, map 16, map 32): a Flax state dict's.
_MAP_STARTS = {bytes([b]) for b in (*range(0x80, 0x90), 0xde, 0xdf)}


@dataclasses.dataclass(frozen=True)
class Source(checkpoint.Location):
  """One msgpack file (`root`) and the arrays decoded from it, keyed as the job keys leaves. Its
  step, from the file name, makes the output a CheckpointManager step; None: a single PyTree."""
  arrays: dict[str, np.ndarray] = dataclasses.field(default_factory=dict, compare=False, repr=False)

  @property
  def item_dir(self) -> paths.Path:
    """The file: what messages name."""
    return self.root


def _step_files(folder: paths.Path) -> dict[int, paths.Path]:
  return {int(m.group(1)): p for p in folder.iterdir()
          if (m := _NAME.fullmatch(p.name)) and p.is_file()}


def detect(path: str) -> bool:
  """Whether `input.path` holds msgpack: a file named `checkpoint_<step>`, or starting as a msgpack
  map does (Orbax writes folders); or a folder of `checkpoint_<step>` files with no Orbax
  checkpoint in it (no `_METADATA`, no step folders)."""
  root = paths.of(path, 'input.path')
  if root.is_file():
    if _NAME.fullmatch(root.name):
      return True
    with root.open('rb') as f:
      return f.read(1) in _MAP_STARTS
  if not root.is_dir() or (root / '_METADATA').exists():
    return False
  return bool(_step_files(root)) and not any(
      p.is_dir() and checkpoint.step_of(p.name) is not None for p in root.iterdir())


def _steps(root: paths.Path) -> dict[int | None, paths.Path]:
  """{step: file} of `input.path`: one file (its step from its name, None without one), or the
  files of a folder."""
  if not root.exists():
    raise SurgeryError(f'input.path {root} does not exist')
  if root.is_file():
    found = _NAME.fullmatch(root.name)
    return {int(found.group(1)) if found else None: root}
  files = _step_files(root)
  if not files:
    raise SurgeryError(f'input.path {root} holds no checkpoint_<step> file '
                       f'(input.format is {FORMAT})')
  return files


def select_steps(path: str, step: Any, exported: Callable[[int], bool]) -> list[int | None]:
  """As `checkpoint.select_steps`, over the `checkpoint_<step>` files."""
  if not isinstance(step, (list, tuple)) and step not in ('all', 'new'):
    return [step]
  found = sorted(s for s in _steps(paths.of(path, 'input.path')) if s is not None)
  if not found:
    raise SurgeryError(f'input.step={step!r} needs checkpoint_<step> files at input.path {path}')
  return checkpoint.choose_steps(step, found, exported, path, 'steps')


def locate(input_config, step: Any) -> Source:
  """The file `input.path` and `input.step` name: a file, or a folder's latest (or chosen) step."""
  if input_config.item is not None:
    raise SurgeryError(f'input.item is {input_config.item!r} but a {FORMAT} checkpoint has no items')
  root = paths.of(input_config.path, 'input.path')
  files = _steps(root)
  if step is None or step == 'latest':
    step = max(files, key=lambda s: -1 if s is None else s)
  elif step not in files:
    raise SurgeryError(f'input.step {step} not found in {root} '
                       f'(steps: {sorted(s for s in files if s is not None)})')
  return Source(files[step], step, None if step is None else ITEM)


def read_metadata(source: Source) -> dict[str, Any]:
  """The file decoded whole into `source.arrays`; returns their nested tree of ShapeDtypeStructs."""
  try:
    encoded = source.root.read_bytes()
  except OSError as e:
    raise SurgeryError(f'cannot read {source.root}: {e.strerror or e}') from None
  try:
    state = serialization.msgpack_restore(encoded)
  except Exception as e:  # pylint: disable=broad-except
    # msgpack raises ValueError, ExtraData, FormatError, ... for cut or foreign bytes.
    raise SurgeryError(f'{source.root} is not a readable Flax msgpack checkpoint (truncated, or '
                       f'another kind of file): {type(e).__name__}: {e}') from None
  del encoded
  if not isinstance(state, dict):
    raise SurgeryError(f'{source.root} is not a Flax checkpoint: it holds a {type(state).__name__}, '
                       'not a tree of arrays')
  try:
    flat_state = tree.flatten(state)
  except SurgeryError as e:
    raise e.within(str(source.root)) from None
  for key, leaf in flat_state.items():
    if not isinstance(leaf, (np.ndarray, np.generic, bool, int, float, complex)):
      raise SurgeryError(f'leaf {key!r} of {source.root} is a {type(leaf).__name__}, not an array; '
                         'the job handles array leaves only')
    source.arrays[key] = np.asarray(leaf)
  if not source.arrays:
    raise SurgeryError(f'{source.root} is not a Flax checkpoint: it holds no arrays')
  shapes = {k: jax.ShapeDtypeStruct(x.shape, x.dtype) for k, x in source.arrays.items()}
  return tree.unflatten(shapes, state)


def held_bytes(source: Source) -> int:
  """Host bytes the input holds for the whole run: the file's arrays, decoded whole."""
  return sum(x.nbytes for x in source.arrays.values())


def model_config(source: Source) -> None:
  """A msgpack checkpoint has no Hugging Face config.json."""
  del source


def abstract_inputs(source: checkpoint.Location, metadata: dict[str, Any], layout: tree.Layout,
                    mesh: Mesh, rules) -> dict[str, jax.ShapeDtypeStruct]:
  """Every leaf on `mesh` with the spec of the first partition rule that names it (by its full key,
  its path under params_root or its parameter's path in a mirror); replicated if none does: the
  format records no sharding."""
  del source
  inputs = {}
  for key, meta in metadata.items():
    spec = sharding.fit_spec(sharding.rule_spec(rules, key, layout.names(key), meta.shape, mesh),
                             meta.shape, mesh, key)
    inputs[key] = sharding.abstract(meta.shape, meta.dtype, mesh, spec)
  return inputs


def restore(source: Source, skeleton: Any,
            targets: dict[str, jax.ShapeDtypeStruct]) -> dict[str, jax.Array]:
  """The `targets` leaves put on their shardings (each process places its own shards); the host
  copies are let go, as each leaf is read by one group only."""
  del skeleton
  placed = {}
  for key, target in targets.items():
    host = source.arrays.pop(key)
    placed[key] = jax.make_array_from_callback(target.shape, target.sharding,
                                               lambda index, host=host: host[index])
  return placed

