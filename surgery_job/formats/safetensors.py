"""Safetensors, as transformers' `save_pretrained` lays them out: `model.safetensors`, or
`model-0000k-of-0000n.safetensors` shards with `model.safetensors.index.json`.

Written without gathering: the plan fixes every tensor's byte range in every file up front
(`safetensors_file.encode`), process 0 writes the headers and sizes the files, and each process
writes the bytes of the shards it holds (replica 0 only) at their offsets. Read the same way: each
process reads the byte ranges of its own shards. The files record no sharding: inputs are placed
by `partition_rules`, else replicated. Tensor names are keys with `/` written as the key separator.
"""

import contextlib
import dataclasses
import json
import math
import os
from typing import Any, Callable, Iterator

import jax
import numpy as np
from absl import logging

from surgery_job import checkpoint, paths, tree
from surgery_job.errors import SurgeryError
from surgery_job.formats import flax_msgpack, safetensors_file as sf

FORMAT = 'safetensors'
TITLE = 'safetensors checkpoint'  # How surgery-job-inspect names it.
RECORDS_SHARDINGS = False  # Whether a leaf's saved PartitionSpec is on disk.
SUFFIX = '.safetensors'
ITEM = 'default'  # The item of an Orbax output of a step, as a CheckpointManager names a single item.
METADATA = {'format': 'pt'}  # What save_pretrained writes; transformers 4.x requires it.
CONFIG_JSON = 'config.json'  # The model's Hugging Face config, beside the files.
_UPLOAD_PIECE = 1 << 24  # Bytes handed to an object store's upload buffer at a time.
_WRITE_PIECE = 1 << 22  # Bytes of shards joined into whole rows at a time (held beside the group).

abstract_inputs = flax_msgpack.abstract_inputs


@dataclasses.dataclass(frozen=True)
class Source(checkpoint.Location):
  """A safetensors file, or a folder of them (with an index when sharded); `step` set: the step
  folder of a folder of steps. `entries` ({key: (file, Entry)}) is filled by `read_metadata`."""
  separator: str = '.'
  entries: dict[str, tuple[paths.Path, sf.Entry]] = dataclasses.field(
      default_factory=dict, compare=False, repr=False)

  @property
  def item_dir(self) -> paths.Path:
    """The file or the folder of files: what messages name."""
    return self.root if self.step is None else self.step_dir


def _step_name(name: str) -> bool:
  """A step folder's name as the job and CheckpointManager write it (`3`; not `³`)."""
  return name.isascii() and name.isdigit()


def _holds(folder: paths.Path) -> bool:
  return any(name.endswith(SUFFIX) or name == sf.INDEX for name in paths.listing(folder))


def _steps(root: paths.Path) -> dict[int | None, paths.Path]:
  """{step: folder} of a folder of step folders; {None: root} for a file or a folder of files."""
  if root.is_file() or _holds(root):
    return {None: root}
  return {int(name): root / name for name, (is_dir, _) in paths.listing(root).items()
          if is_dir and _step_name(name) and _holds(root / name)}


def detect(path: str) -> bool:
  """A `*.safetensors` file, a folder holding them (or an index), or a folder whose latest step
  folder holds them (one listing: an Orbax directory may have hundreds of steps)."""
  root = paths.of(path, 'input.path')
  if root.is_file():
    return root.name.endswith(SUFFIX)
  if not root.is_dir():
    return False
  listing = paths.listing(root)
  if any(name.endswith(SUFFIX) or name == sf.INDEX for name in listing):
    return True
  steps = [int(name) for name, (is_dir, _) in listing.items() if is_dir and _step_name(name)]
  return bool(steps) and _holds(root / str(max(steps)))


def select_steps(path: str, step: Any, exported: Callable[[int], bool]) -> list[int | None]:
  """As `checkpoint.select_steps`, over the step folders that hold safetensors."""
  if not isinstance(step, (list, tuple)) and step not in ('all', 'new'):
    return [step]
  found = sorted(s for s in _steps(paths.of(path, 'input.path')) if s is not None)
  if not found:
    raise SurgeryError(f'input.step={step!r} needs step folders of safetensors at input.path {path}')
  return checkpoint.choose_steps(step, found, exported, path, 'steps')


def locate(input_config, step: Any) -> Source:
  if input_config.item is not None:
    raise SurgeryError(f'input.item is {input_config.item!r} but safetensors have no items')
  root = paths.of(input_config.path, 'input.path')
  if not root.exists():
    raise SurgeryError(f'input.path {root} does not exist')
  found = _steps(root)
  if not found:
    raise SurgeryError(f'input.path {root} holds no safetensors file (input.format is {FORMAT})')
  if step is None or step == 'latest':
    step = max(found, key=lambda s: -1 if s is None else s)
  elif step not in found:
    raise SurgeryError(f'input.step {step} not found in {root} '
                       f'(steps: {sorted(s for s in found if s is not None)})')
  if step is None:
    return Source(root, None, None, separator=input_config.key_separator)
  return Source(root, step, ITEM, step_folder=found[step].name,
                separator=input_config.key_separator)


def _files(location: paths.Path) -> list[paths.Path]:
  """The files of a safetensors checkpoint: the index's, or every `*.safetensors` of the folder."""
  if location.is_file():
    return [location]
  if (location / sf.INDEX).exists():
    return [location / name for name in sorted(set(sf.read_index(location).values()))]
  return sorted(location / name for name, (is_dir, _) in paths.listing(location).items()
                if name.endswith(SUFFIX) and not is_dir)


def read_metadata(source: Source) -> dict[str, Any]:
  """The headers of every file (checked); returns their tensors as a nested tree of
  ShapeDtypeStructs, names split on `input.key_separator`."""
  for file in _files(source.item_dir):
    for name, entry in sf.read_header(file)[0].items():
      key = tree.SEP.join(name.split(source.separator))
      if key in source.entries:
        raise SurgeryError(f'safetensors file {file}: tensor {name!r} is also in '
                           f'{source.entries[key][0]}' if source.entries[key][1].name == name else
                           f'safetensors file {file}: tensor {name!r} and tensor '
                           f'{source.entries[key][1].name!r} both make the key {key!r}')
      if '' in key.split(tree.SEP):
        raise SurgeryError(f'safetensors file {file}: tensor {name!r} makes the key {key!r}, which '
                           f'has an empty part (input.key_separator is {source.separator!r})')
      source.entries[key] = (file, entry)
  if not source.entries:
    raise SurgeryError(f'{source.item_dir} holds no tensors')
  for key, (file, entry) in source.entries.items():
    parts = key.split(tree.SEP)
    above = next((parent for depth in range(1, len(parts))
                  if (parent := tree.SEP.join(parts[:depth])) in source.entries), None)
    if above is not None:  # `model.embed` and `model.embed.weight`: a leaf and a subtree at once.
      other_file, other = source.entries[above]
      raise SurgeryError(f'safetensors file {file}: tensor {entry.name!r} lies under tensor '
                         f'{other.name!r}' + (f' of {other_file}' if other_file != file else '')
                         + '; a tree holds a leaf or a subtree at one key, not both')
  return tree.unflatten({k: jax.ShapeDtypeStruct(e.shape, e.dtype)
                         for k, (_, e) in source.entries.items()}, {})


def _each_block_once(reader: sf.Reader,
                     entry: sf.Entry) -> Callable[[tuple[slice, ...]], np.ndarray]:
  """x[index] for each of this process's devices; a block that several of them hold (replicated
  along a mesh axis) is read once, not once per device: on gs:// each read is a request."""
  blocks: dict[tuple, np.ndarray] = {}

  def block(index: tuple[slice, ...]) -> np.ndarray:
    bounds = tuple(part.indices(size) for part, size in zip(index, entry.shape))
    if bounds not in blocks:
      blocks[bounds] = sf.read_block(reader, entry, index)
    return blocks[bounds]
  return block


def _read(entries: dict[str, tuple[paths.Path, sf.Entry]],
          targets: dict[str, jax.ShapeDtypeStruct]) -> dict[str, jax.Array]:
  """Each target put on its sharding, each process reading only the bytes of its own shards."""
  readers = {}
  try:
    placed = {}
    for key, target in targets.items():
      file, entry = entries[key]
      if file not in readers:
        readers[file] = sf.Reader(file)
      placed[key] = jax.make_array_from_callback(target.shape, target.sharding,
                                                 _each_block_once(readers[file], entry))
    return placed
  finally:
    for reader in readers.values():
      reader.__exit__(None, None, None)


def restore(source: Source, skeleton: Any,
            targets: dict[str, jax.ShapeDtypeStruct]) -> dict[str, jax.Array]:
  del skeleton
  return _read(source.entries, targets)


def held_bytes(source: Source) -> int:
  """Each group reads its own byte ranges: nothing is held for the whole run."""
  del source
  return 0


def model_config(source: Source) -> dict[str, Any] | None:
  """The folder's config.json, which the ops of a model family check the tensors against; None
  for a single file or a folder without one."""
  path = source.item_dir / CONFIG_JSON
  if not source.item_dir.is_dir() or not path.is_file():
    return None
  try:
    found = json.loads(path.read_text())
  except (ValueError, UnicodeDecodeError) as e:
    raise SurgeryError(f'{path} is not JSON: {e}') from None
  if not isinstance(found, dict):
    raise SurgeryError(f'{path} is not a JSON object')
  return found


def tensor_name(key: str, output_config) -> str:
  return key.replace(tree.SEP, output_config.key_separator)


def check_outputs(outputs: dict[str, jax.ShapeDtypeStruct], output_config) -> None:
  """Every leaf has a safetensors dtype, and every name is one tensor's; the extra files exist."""
  if output_config.custom_metadata:
    raise SurgeryError(f'output.custom_metadata is set but output.format {FORMAT} has no step '
                       'metadata to record it in')
  names = {}
  for key, leaf in outputs.items():
    try:
      sf.dtype_name(leaf.dtype)
    except SurgeryError as e:
      raise SurgeryError(f'output.format is {FORMAT} but leaf {key!r}: {e} (drop it or cast it '
                         'first)') from None
    name = tensor_name(key, output_config)
    if name in names:
      raise SurgeryError(f'output.format is {FORMAT} but leaves {names[name]!r} and {key!r} both '
                         f'make the tensor name {name!r} (output.key_separator is '
                         f'{output_config.key_separator!r})')
    names[name] = key
  for extra in output_config.extra_files:
    if not paths.of(extra, 'output.extra_files').is_file():
      raise SurgeryError(f'output.extra_files: {extra} is not a file')
  if output_config.item is not None:
    raise SurgeryError(f'output.item is {output_config.item!r} but output.format {FORMAT} has no '
                       'items: the step folder holds the files')


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where every tensor goes: {file name: header bytes}, {key: (file name, Entry)}."""
  headers: dict[str, bytes]
  entries: dict[str, tuple[str, sf.Entry]]

  @property
  def weight_map(self) -> dict[str, str]:
    return {entry.name: file for file, entry in self.entries.values()}


def plan_files(outputs: dict[str, jax.ShapeDtypeStruct], output_config) -> Layout:
  """Files of at most `output.max_shard_size` bytes, filled in the plan's order as transformers
  fills them; each file's header and tensor offsets as `safetensors` lays them out."""
  keys = {tensor_name(key, output_config): key for key in outputs}
  sizes = [(name, outputs[key].size * outputs[key].dtype.itemsize) for name, key in keys.items()]
  shards = sf.shard_files(sizes, output_config.max_shard_size)
  headers, entries = {}, {}
  for file, names in zip(sf.file_names(len(shards)), shards):
    headers[file], placed = sf.encode(
        [(name, outputs[keys[name]].dtype, outputs[keys[name]].shape) for name in names], METADATA)
    entries.update({keys[name]: (file, entry) for name, entry in placed.items()})
  return Layout(headers, entries)


def _end(header: bytes, entries) -> int:
  return max([len(header), *(e.offset + e.nbytes for e in entries)])


def _block_name(index: tuple[slice, ...], shape: tuple[int, ...]) -> str:
  """A shard's object name on an object store: its start and stop on each axis."""
  bounds = [part.indices(size)[:2] for part, size in zip(index, shape)]
  return '_'.join(f'{start}-{stop}' for start, stop in bounds) or 'scalar'


def _block_index(name: str) -> tuple[slice, ...]:
  if name == 'scalar':
    return ()
  return tuple(slice(*map(int, bounds.split('-'))) for bounds in name.split('_'))


def joined_rows(shards: list[tuple[tuple[slice, ...], np.ndarray]], shape: tuple[int, ...],
                piece: int = _WRITE_PIECE) -> Iterator[tuple[tuple[slice, ...], np.ndarray]]:
  """`shards` ((index, block) of one tensor) as the blocks to write: shards side by side along the
  last axis, at the same place on the others, joined about `piece` bytes of rows at a time (one
  row if longer). Each row of a shard cut along the last axis is a write call of its own; a row
  of joined shards is one, and whole rows are one range of the file (5 times faster, measured)."""
  if len(shape) < 2:  # Each shard is one range of the file already.
    yield from shards
    return
  runs: list[tuple[list[tuple[int, int]], list[np.ndarray]]] = []
  for index, block in sorted(shards, key=lambda s: [p.indices(n)[:2] for p, n in zip(s[0], shape)]):
    bounds = [part.indices(size)[:2] for part, size in zip(index, shape)]
    if runs and runs[-1][0][:-1] == bounds[:-1] and runs[-1][0][-1][1] == bounds[-1][0]:
      runs[-1][0][-1] = (runs[-1][0][-1][0], bounds[-1][1])
      runs[-1][1].append(block)
    else:
      runs.append((bounds, [block]))
  for bounds, blocks in runs:
    if len(blocks) == 1:
      yield tuple(slice(*b) for b in bounds), blocks[0]
      continue
    (first, stop), rest = bounds[0], [slice(*b) for b in bounds[1:]]
    row = sum(block[:1].nbytes for block in blocks)
    step = max(1, piece // max(1, row))
    for start in range(first, stop, step):
      end = min(start + step, stop)
      yield ((slice(start, end), *rest),
             np.concatenate([block[start - first:end - first] for block in blocks], axis=-1))


def stream_tensor(out, entry: sf.Entry, blocks_dir: paths.Path, piece: int = _UPLOAD_PIECE) -> None:
  """Writes the bytes of tensor `entry` to the binary file `out`, from the objects in `blocks_dir`
  (one per shard, named by `_block_name`), rows of the first axis at a time, about `piece` bytes:
  each row range read from each shard it crosses, never a whole shard or tensor."""
  if entry.nbytes == 0:
    return
  with contextlib.ExitStack() as opened:
    readers = [(_block_index(block.name), opened.enter_context(sf.Reader(block)))
               for block in blocks_dir.iterdir()]
    if not entry.shape:
      out.write(readers[0][1].read(0, entry.nbytes))
      return
    rows = entry.shape[0]
    step = max(1, piece * rows // entry.nbytes)
    for start in range(0, rows, step):
      stop = min(start + step, rows)
      rows_data = np.empty((stop - start, *entry.shape[1:]), entry.dtype)
      for index, reader in readers:
        low, high = max(start, index[0].start), min(stop, index[0].stop)
        if low >= high:
          continue
        block_shape = tuple(part.stop - part.start for part in index[1:])
        row_bytes = math.prod(block_shape) * entry.dtype.itemsize
        data = reader.read((low - index[0].start) * row_bytes, (high - low) * row_bytes)
        rows_data[(slice(low - start, high - start), *index[1:])] = np.frombuffer(
            data, entry.dtype).reshape((high - low, *block_shape))
      out.write(rows_data.reshape(-1).view(np.uint8))


class Writer:
  """Writes the safetensors files into a folder beside `unit_dir` (in the run's work folder, which
  a resumed run takes over), then moves them to `unit_dir` with the index
  and `output.extra_files`. Every process writes the bytes of the shards it holds.

  On an object store, where an object cannot be written at an offset, each process uploads its
  shards as objects of their own instead; at the end each process assembles the files assigned to
  it (every P-th), streaming the file up a few rows of a tensor at a time, each piece put together
  from ranged reads of its shards' objects. That costs the data uploaded twice and downloaded once
  more; a process holds one piece (`_UPLOAD_PIECE` bytes, or one row if longer) and the upload
  buffer, whatever the size of a tensor.

  `model_config`, the config.json that goes with the tensors, is written beside them, unless
  `output.extra_files` names a config.json: the user's file wins."""

  def __init__(self, unit_dir: paths.Path, location: checkpoint.Location,
               barrier: Callable[[str], None], output_config, outputs: dict[str, jax.ShapeDtypeStruct],
               skeleton: Any, model_config: dict[str, Any] | None = None):
    del location, skeleton
    self.unit_dir, self.barrier = unit_dir, barrier
    self.layout = plan_files(outputs, output_config)
    self.extra_files = [paths.of(extra) for extra in output_config.extra_files]
    self.model_config = model_config
    if model_config is not None and any(e.name == CONFIG_JSON for e in self.extra_files):
      if jax.process_index() == 0:
        logging.info('output.extra_files names a config.json: it is written in place of the one '
                     'the ops made or the input had.')
      self.model_config = None
    self.staged = unit_dir.with_name(f'{unit_dir.name}.{FORMAT}-staged')
    self.on_object_store = paths.on_object_store(unit_dir)
    self.fds: dict[str, int] = {}
    self.bytes_written = 0
    self.checked = False  # Whether the written headers were found to be the planned ones.

  def start(self, resumed: bool) -> None:
    """Process 0: every file created with its header and at its full size (the umask sets its
    mode: the `safetensors` writer's 0600 would hide it from other users). `resumed`: an earlier
    run of this surgery made them, and wrote groups into them, unless it stopped first. On an
    object store nothing is made before the shards' objects."""
    if self.on_object_store:
      return
    sizes = {file: _end(header, [e for f, e in self.layout.entries.values() if f == file])
             for file, header in self.layout.headers.items()}
    if resumed and all(paths.is_file(self.staged / file) and paths.size(self.staged / file) == size
                       for file, size in sizes.items()):
      return
    self.staged.mkdir(parents=True, exist_ok=True)
    for file, header in self.layout.headers.items():
      fd = os.open(self.staged / file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
      try:
        os.pwrite(fd, header, 0)
        os.ftruncate(fd, sizes[file])
        os.fsync(fd)
      finally:
        os.close(fd)

  def saves(self) -> set[str]:
    """Nothing to record: a group's byte ranges are fixed, and written again when not on record."""
    return set()

  def resumable_saves(self) -> set[str]:
    """None to check: a group on record has its bytes in the staged files (or, after a finalize
    began, validation finds them missing and the next run starts over)."""
    return set()

  def keep_only(self, names: set[str]) -> None:
    del names

  def write(self, outputs: dict[str, jax.Array]) -> None:
    """This process's shards of one group's leaves, each at its offsets, synced to disk before the
    group goes on record; on an object store, each shard as an object of its own."""
    if self.on_object_store:
      for key, array in outputs.items():
        for shard in array.addressable_shards:
          if shard.replica_id == 0:
            data = np.ascontiguousarray(np.asarray(shard.data))
            name = _block_name(shard.index, array.shape)
            (self.staged / self.layout.entries[key][1].name / name).write_bytes(
                data.reshape(-1).view(np.uint8))  # Its own bytes: tobytes() would copy them.
            self.bytes_written += data.nbytes
      return
    touched = set()
    for key, array in outputs.items():
      file, entry = self.layout.entries[key]
      if file not in self.fds:
        self.fds[file] = os.open(self.staged / file, os.O_WRONLY)
      shards = [(shard.index, np.asarray(shard.data)) for shard in array.addressable_shards
                if shard.replica_id == 0]
      for index, block in joined_rows(shards, array.shape):
        sf.write_block(self.fds[file], entry, index, block)
        self.bytes_written += block.nbytes
        touched.add(file)
    for file in touched:
      os.fdatasync(self.fds[file])

  def finish(self) -> dict[str, paths.Path]:
    """Every process's bytes written; process 0 moves the files into `unit_dir` and adds the index
    (sharded) and the extra files."""
    for fd in self.fds.values():
      os.close(fd)
    self.fds.clear()
    logging.info('Process %d wrote %d bytes of safetensors data.', jax.process_index(),
                 self.bytes_written)
    self.barrier('safetensors_written')
    if self.on_object_store:
      for file in sorted(self.layout.headers)[jax.process_index()::jax.process_count()]:
        self._assemble(file)
      self.barrier('safetensors_assembled')
    if jax.process_index() == 0:
      if self.on_object_store:
        self.staged.rmtree()
      else:
        self.staged.rename(self.unit_dir)
      # As an Orbax step has it: what readers on gs:// and the job's own step listing go by.
      (self.unit_dir / checkpoint.COMMIT_FILE).write_text('')
      if len(self.layout.headers) > 1:
        entries = [e for _, e in self.layout.entries.values()]
        (self.unit_dir / sf.INDEX).write_text(sf.index_json(
            self.layout.weight_map, sum(e.nbytes for e in entries),
            sum(math.prod(e.shape) for e in entries)))
      if self.model_config is not None:
        (self.unit_dir / CONFIG_JSON).write_text(
            json.dumps(self.model_config, indent=2, sort_keys=True) + '\n')
      for extra in self.extra_files:
        extra.copy(self.unit_dir / extra.name)
    self.barrier('laid_out')
    return {'': self.unit_dir}

  def _assemble(self, file: str) -> None:
    """One file streamed up from its tensors, each put together from its shards' objects."""
    with (self.unit_dir / file).open('wb') as f:
      f.write(self.layout.headers[file])
      for entry in sorted((e for f, e in self.layout.entries.values() if f == file),
                          key=lambda e: e.offset):
        stream_tensor(f, entry, self.staged / entry.name)

  def read_back(self, trees: dict[str, paths.Path],
                targets: dict[str, jax.ShapeDtypeStruct]) -> dict[str, jax.Array]:
    """The `targets` leaves read from the written files, after their headers (and index) are found
    to be the planned ones."""
    folder = trees['']
    if not self.checked:
      self._check(folder)
      self.checked = True
    return _read({k: (folder / file, e) for k, (file, e) in self.layout.entries.items()}, targets)

  def _check(self, folder: paths.Path) -> None:
    for file in self.layout.headers:
      entries, metadata = sf.read_header(folder / file)
      planned = {e.name: e for f, e in self.layout.entries.values() if f == file}
      if entries != planned or metadata != METADATA:
        raise RuntimeError(f'{folder / file}: its header is not the planned one')
    if len(self.layout.headers) > 1 and sf.read_index(folder) != self.layout.weight_map:
      raise RuntimeError(f'{folder / sf.INDEX}: its weight map is not the planned one')
