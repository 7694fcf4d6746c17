"""The safetensors file format, byte for byte, with numpy alone: the header the `safetensors`
writer makes, so that every process can write the bytes of the shards it holds at their place in
the file; every check of a damaged file; transformers' split into shard files and its index; and
reads and writes of one shard of a tensor that touch only that shard's bytes.

  DTYPES: {safetensors dtype name: numpy dtype}; dtype_name(dtype) -> name (SurgeryError if none).
  Entry(name, dtype, shape, offset, nbytes): `offset` is the tensor's first byte in the file.
  encode([(name, dtype, shape)], metadata) -> (header bytes, {name: Entry}), as save_file lays out.
  read_header(path) -> ({name: Entry} in file order, metadata), checked.
  shard_files([(name, nbytes)], max_shard_size) -> [[names in file 1], ...]; file_names(n);
  index_json(weight_map, total_size, total_parameters=None); read_index(folder) -> {tensor: file}.
  Reader(path or binary file): ranged reads (os.preadv locally, one ranged GET each on gs://).
  read_block(path or Reader, entry, index) -> x[index]; write_block(fd, entry, index, x[index]).
"""

import contextlib
import dataclasses
import json
import math
import mmap
import os
import struct

import ml_dtypes
import numpy as np
from etils import epath
from numpy.lib.stride_tricks import as_strided

from surgery_job import paths
from surgery_job.errors import SurgeryError

# In the order of the Rust writer's `Dtype` enum (safetensors/src/tensor.rs), which lays tensors
# out by it, last first, then by name. _PACKED ones hold several values in a byte: left out.
DTYPES = {name: np.dtype(scalar) for name, scalar in (
    ('BOOL', np.bool_), ('U8', np.uint8), ('I8', np.int8), ('F8_E5M2', ml_dtypes.float8_e5m2),
    ('F8_E4M3', ml_dtypes.float8_e4m3fn), ('F8_E8M0', ml_dtypes.float8_e8m0fnu),
    ('F8_E4M3FNUZ', ml_dtypes.float8_e4m3fnuz), ('F8_E5M2FNUZ', ml_dtypes.float8_e5m2fnuz),
    ('I16', np.int16), ('U16', np.uint16), ('F16', np.float16), ('BF16', ml_dtypes.bfloat16),
    ('I32', np.int32), ('U32', np.uint32), ('F32', np.float32), ('C64', np.complex64),
    ('F64', np.float64), ('I64', np.int64), ('U64', np.uint64))}
_PACKED = ('F4', 'F6_E2M3', 'F6_E3M2')
_RANK = {name: rank for rank, name in enumerate(DTYPES)}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_LENGTH = struct.Struct('<Q')
MAX_HEADER = 100_000_000  # safetensors' MAX_HEADER_SIZE: its readers refuse longer headers.
INDEX = 'model.safetensors.index.json'


def dtype_name(dtype) -> str:
  """The safetensors name of `dtype` (either byte order: the file is little-endian)."""
  try:
    dtype = np.dtype(dtype)
    name = _NAMES.get(dtype.newbyteorder('<'))
  except TypeError:  # Not a numpy dtype at all: a typed PRNG key's.
    name = None
  if name is None:
    raise SurgeryError(f'dtype {dtype} has no safetensors equivalent (safetensors stores '
                       f'{", ".join(DTYPES)})')
  return name


@dataclasses.dataclass(frozen=True)
class Entry:
  name: str
  dtype: np.dtype
  shape: tuple[int, ...]
  offset: int  # Of the tensor's first byte, from the start of the file.
  nbytes: int


def encode(tensors, metadata: dict[str, str] | None = None) -> tuple[bytes, dict[str, Entry]]:
  """The header of a file of `tensors` ((name, dtype, shape) each) and where each one's bytes go:
  the file is byte-identical to `safetensors.numpy.save_file`'s. (The Rust writer puts a metadata
  of several keys in hash order, which changes from run to run; here they are sorted.)"""
  header, spans, begin = {}, [], 0
  if metadata is not None:
    if not all(isinstance(v, str) for item in metadata.items() for v in item):
      raise SurgeryError(f'safetensors metadata must map strings to strings: {metadata!r}')
    header['__metadata__'] = dict(sorted(metadata.items()))
  for name, dtype, shape in sorted(tensors, key=lambda t: (-_RANK[dtype_name(t[1])], t[0])):
    if name in header:
      raise SurgeryError(f'tensor name {name!r} is given twice' if name != '__metadata__' else
                         'tensor name \'__metadata__\' is reserved by safetensors')
    dtype, shape = DTYPES[dtype_name(dtype)], tuple(int(d) for d in shape)
    nbytes = math.prod(shape) * dtype.itemsize
    header[name] = {'dtype': dtype_name(dtype), 'shape': list(shape),
                    'data_offsets': [begin, begin + nbytes]}
    spans.append((name, dtype, shape, begin, nbytes))
    begin += nbytes
  text = json.dumps(header, ensure_ascii=False, separators=(',', ':')).encode()
  text += b' ' * (-len(text) % _LENGTH.size)  # Both writers align the data to 8 bytes.
  if len(text) > MAX_HEADER:
    raise SurgeryError(f'a safetensors header of {len(text)} bytes is over its limit of {MAX_HEADER}')
  start = _LENGTH.size + len(text)
  return _LENGTH.pack(len(text)) + text, {name: Entry(name, dtype, shape, start + begin, nbytes)
                                          for name, dtype, shape, begin, nbytes in spans}


class Reader:
  """Ranged reads of one file: `os.preadv` on a local path, one ranged GET each on gs://, seek and
  readinto on an open binary file. Row blocks of one block closer than `max_gap` bytes are read
  together, up to `chunk` bytes at a time: on an object store a request costs as much as
  megabytes of transfer; a local file is mapped instead, which reads only the pages the rows are
  on (a read call per short row is 100 times slower)."""

  def __init__(self, source):
    self.name, self._fd, self._file, self._fs = str(source), None, None, None
    if hasattr(source, 'readinto'):
      self._file, self.name = source, getattr(source, 'name', self.name)
      self.size, self.max_gap, self.chunk = source.seek(0, os.SEEK_END), 1 << 16, 1 << 24
    elif paths.on_object_store(source):
      self._fs, self._path = epath.backend.fsspec_backend.fs(source), os.fspath(source)
      self.size, self.max_gap, self.chunk = self._fs.size(self._path), 1 << 22, 1 << 26
    else:
      self._fd = os.open(source, os.O_RDONLY)
      self.size, self.max_gap, self.chunk = os.fstat(self._fd).st_size, math.inf, 1 << 26

  def __enter__(self) -> 'Reader':
    return self

  def __exit__(self, *unused_exc_info) -> None:
    if self._fd is not None:
      os.close(self._fd)
      self._fd = None

  def read_into(self, offset: int, buffer) -> None:
    """Fills `buffer` with the file's bytes from `offset`; EOFError where the file ends first."""
    view = memoryview(buffer).cast('B')
    if offset + len(view) > self.size:
      raise EOFError(offset + len(view))
    if self._fs is not None:
      view[:] = self._fs.cat_file(self._path, start=offset, end=offset + len(view))
      return
    while view:
      if self._fd is not None:
        count = os.preadv(self._fd, [view], offset)
      else:
        self._file.seek(offset)
        count = self._file.readinto(view)
      if not count:
        raise EOFError(offset + len(view))
      view, offset = view[count:], offset + count

  def read(self, offset: int, size: int) -> bytearray:
    data = bytearray(size)
    self.read_into(offset, data)
    return data

  def read_rows(self, offset: int, stride: int, rows: np.ndarray) -> None:
    """Fills `rows` (uint8, one row per row block) with row blocks `stride` bytes apart from
    `offset`: one read of the bytes they span, or one mapping of them."""
    count, run = rows.shape
    size = (count - 1) * stride + run
    if count == 1:
      self.read_into(offset, rows)
    elif self._fd is None:
      rows[:] = as_strided(np.frombuffer(self.read(offset, size), np.uint8), rows.shape, (stride, 1))
    else:
      if offset + size > os.fstat(self._fd).st_size:  # Mapped bytes past the end: SIGBUS.
        raise EOFError(offset + size)
      start = offset - offset % mmap.ALLOCATIONGRANULARITY
      with mmap.mmap(self._fd, offset + size - start, access=mmap.ACCESS_READ, offset=start) as mapped:
        span = np.frombuffer(mapped, np.uint8, size, offset - start)
        rows[:] = as_strided(span, rows.shape, (stride, 1))
        del span  # The mapping closes only once nothing points into it.


def _opened(source) -> contextlib.AbstractContextManager[Reader]:
  return contextlib.nullcontext(source) if isinstance(source, Reader) else Reader(source)


class _Repeated(ValueError):
  """A JSON object with a key twice (Python's json would keep the last silently)."""


def _unique(pairs: list) -> dict:
  found = {}
  for key, value in pairs:
    if key in found:
      raise _Repeated(key)
    found[key] = value
  return found


def _natural(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_header(path) -> tuple[dict[str, Entry], dict[str, str]]:
  """Every tensor's Entry, in file order, and the `__metadata__` ({} if none) of the file at `path`
  (local or gs://), reading its first 8 bytes and then the header only. Every check safetensors'
  reader makes, each failure one line naming the file and the tensor."""
  with _opened(path) as reader:
    def bad(message, tensor=None):
      return SurgeryError(f'safetensors file {reader.name}: '
                          + (f'tensor {tensor!r}: ' if tensor is not None else '') + message)
    if reader.size < _LENGTH.size:
      raise bad(f'{reader.size} bytes, too short for the 8-byte header length')
    (length,) = _LENGTH.unpack(reader.read(0, _LENGTH.size))
    if length > MAX_HEADER:
      raise bad(f'header length {length} is over safetensors\' limit of {MAX_HEADER} bytes')
    if _LENGTH.size + length > reader.size:
      raise bad(f'header length {length} runs past the end of the file ({reader.size} bytes)')
    try:
      header = json.loads(reader.read(_LENGTH.size, length).decode(), object_pairs_hook=_unique)
    except _Repeated as e:
      raise bad('listed twice in the header', e.args[0]) from None
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors.
      raise bad(f'header is not valid JSON: {e}') from None
    data_size = reader.size - _LENGTH.size - length
  if not isinstance(header, dict):
    raise bad(f'header is a JSON {type(header).__name__}, not an object')
  metadata = header.pop('__metadata__', {})
  if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
    raise bad(f'__metadata__ is not an object of strings: {json.dumps(metadata)}')
  spans = []
  for name, info in header.items():
    if not (isinstance(info, dict) and {'dtype', 'shape', 'data_offsets'} <= info.keys()):
      raise bad(f'{json.dumps(info)} is not an object with dtype, shape and data_offsets', name)
    dtype, shape, offsets = info['dtype'], info['shape'], info['data_offsets']
    if dtype in _PACKED:
      raise bad(f'dtype {dtype} packs several values into a byte; the job reads '
                f'{", ".join(DTYPES)}', name)
    if not (isinstance(dtype, str) and dtype in DTYPES):
      raise bad(f'unknown dtype {json.dumps(dtype)} (known: {", ".join(DTYPES)})', name)
    if not (isinstance(shape, list) and all(_natural(d) for d in shape)):
      raise bad(f'shape {json.dumps(shape)} is not a list of non-negative integers', name)
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_natural(o) for o in offsets)
            and offsets[0] <= offsets[1]):
      raise bad(f'data_offsets {json.dumps(offsets)} are not [begin, end] with 0 <= begin <= end',
                name)
    nbytes = math.prod(shape) * DTYPES[dtype].itemsize
    if offsets[1] - offsets[0] != nbytes:
      raise bad(f'shape {shape} of {dtype} is {nbytes} bytes but data_offsets {offsets} hold '
                f'{offsets[1] - offsets[0]}', name)
    spans.append((offsets[0], offsets[1], name, DTYPES[dtype], tuple(shape)))
  position, previous = 0, None
  for begin, end, name, _, _ in sorted(spans):
    if begin < position:
      raise bad(f'data_offsets [{begin}, {end}] overlap those of {previous!r}', name)
    if begin > position:
      raise bad(f'bytes {position} to {begin} of the data, before it, belong to no tensor', name)
    if end > data_size:
      raise bad(f'data_offsets [{begin}, {end}] run past the end of the file, whose data holds '
                f'{data_size} bytes (a truncated file?)', name)
    position, previous = end, name
  if position < data_size:
    raise bad(f'the last {data_size - position} bytes of the file belong to no tensor')
  start = _LENGTH.size + length
  return {name: Entry(name, dtype, shape, start + begin, end - begin)
          for begin, end, name, dtype, shape in sorted(spans)}, metadata


def shard_files(sizes, max_shard_size: int) -> list[list[str]]:
  """The names in each file, as transformers' save_pretrained splits a model (huggingface_hub's
  split_state_dict_into_shards_factory, serialization/_base.py): tensors in the order given fill a
  file until the next one would take it past `max_shard_size`; a bigger tensor gets a file of its
  own, placed before the file being filled. No tensors: no file."""
  files, current, current_size = [], [], 0
  for name, nbytes in sizes:
    if nbytes > max_shard_size:
      files.append([name])
      continue
    if current_size + nbytes > max_shard_size:
      files.append(current)
      current, current_size = [], 0
    current.append(name)
    current_size += nbytes
  return files + [current] if current else files


def file_names(count: int) -> list[str]:
  if count == 1:
    return ['model.safetensors']
  return [f'model-{k:05d}-of-{count:05d}.safetensors' for k in range(1, count + 1)]


def index_json(weight_map: dict[str, str], total_size: int,
               total_parameters: int | None = None) -> str:
  """`model.safetensors.index.json` as save_pretrained writes it (modeling_utils.py)."""
  metadata = {'total_size': total_size}
  if total_parameters is not None:
    metadata['total_parameters'] = total_parameters
  return json.dumps({'metadata': metadata, 'weight_map': weight_map}, indent=2, sort_keys=True) + '\n'


def read_index(folder) -> dict[str, str]:
  """{tensor: file name} of a sharded folder's index, checked against every file's header."""
  where = epath.Path(folder) / INDEX
  try:
    text = where.read_text()
  except OSError as e:
    raise SurgeryError(f'safetensors index {where}: cannot be read: {e}') from None
  try:
    index = json.loads(text, object_pairs_hook=_unique)
  except _Repeated as e:
    raise SurgeryError(f'safetensors index {where}: {e.args[0]!r} is listed twice') from None
  except ValueError as e:
    raise SurgeryError(f'safetensors index {where}: not valid JSON: {e}') from None
  weight_map = index.get('weight_map') if isinstance(index, dict) else None
  if not (isinstance(weight_map, dict) and all(isinstance(f, str) for f in weight_map.values())):
    raise SurgeryError(f'safetensors index {where}: no "weight_map" object of file names')
  present = paths.listing(epath.Path(folder))
  first_tensor = {file: tensor for tensor, file in reversed(weight_map.items())}
  held = {}
  for file in sorted(first_tensor):
    if file not in present or present[file][0]:
      raise SurgeryError(f'safetensors index {where}: tensor {first_tensor[file]!r}: its file '
                         f'{file} does not exist')
    for name in read_header(epath.Path(folder) / file)[0]:
      if name in held:
        raise SurgeryError(f'safetensors index {where}: tensor {name!r} is in both {held[name]} '
                           f'and {file}')
      held[name] = file
  for tensor, file in weight_map.items():
    if held.get(tensor) != file:
      raise SurgeryError(f'safetensors index {where}: tensor {tensor!r}: the index puts it in '
                         f'{file}, whose header does not list it')
  return weight_map


def _row_blocks(entry: Entry, index) -> tuple[tuple[int, ...], int, int, int, list[int]]:
  """Where x[index] lies in the file, x row-major: (block shape, bytes in one contiguous row
  block, bytes from one row block to the next, row blocks at each outer position, the file
  offset of each outer position's first row block). The inner dims the block spans whole are
  one row block with the dim before them."""
  index = tuple(index) + (slice(None),) * (len(entry.shape) - len(index))
  bounds = [part.indices(size) for part, size in zip(index, entry.shape)]
  if len(index) != len(entry.shape) or any(step != 1 for _, _, step in bounds):
    raise ValueError(f'{index}: not slices of step 1 of {entry.name}{list(entry.shape)}')
  block = tuple(max(0, stop - start) for start, stop, _ in bounds)
  full, sizes = (1, 1) + entry.shape, (1, 1) + block  # Two dims of 1 in front: no special cases.
  starts = (0, 0) + tuple(start for start, _, _ in bounds)
  strides = [math.prod(full[d + 1:]) * entry.dtype.itemsize for d in range(len(full))]
  inner = len(full) - 1  # Becomes the last dim the block does not span whole (at least 1).
  while inner > 1 and sizes[inner] == full[inner]:
    inner -= 1
  first = entry.offset + starts[inner - 1] * strides[inner - 1] + starts[inner] * strides[inner]
  bases = [first + sum((starts[d] + i) * strides[d] for d, i in enumerate(outer))
           for outer in np.ndindex(*sizes[:inner - 1])]
  return block, sizes[inner] * strides[inner], strides[inner - 1], sizes[inner - 1], bases


def read_block(source, entry: Entry, index=()) -> np.ndarray:
  """x[index] of the stored tensor x (`index`: slices of step 1), reading only the bytes it spans:
  one read when they are contiguous, else row block by row block, neighbours merged into one read
  where the gap between them is small (the Reader's `max_gap`)."""
  block, run, stride, rows, bases = _row_blocks(entry, index)
  out = np.empty(block, entry.dtype)
  if out.size == 0:
    return out
  out_rows = out.reshape(-1).view(np.uint8).reshape(-1, run)
  with _opened(source) as reader:
    together = max(1, (reader.chunk - run) // stride + 1) if stride - run <= reader.max_gap else 1
    done = 0
    try:
      for base in bases:
        for row in range(0, rows, together):
          count = min(together, rows - row)
          reader.read_rows(base + row * stride, stride, out_rows[done:done + count])
          done += count
    except EOFError as e:
      raise SurgeryError(f'safetensors file {reader.name}: tensor {entry.name!r}: the file ends at '
                         f'byte {reader.size}, before byte {e.args[0]} (a truncated file?)') from None
  return out


def write_block(fd, entry: Entry, index, array) -> None:
  """Writes `array` = x[index] of the tensor x at its place in the open file `fd` (a descriptor or
  a file with fileno()), row block by row block, from a C-contiguous little-endian copy: a view's
  raw buffer is not its values in row-major order."""
  block, run, stride, rows, bases = _row_blocks(entry, index)
  if tuple(np.shape(array)) != block or dtype_name(array.dtype) != dtype_name(entry.dtype):
    raise ValueError(f'{entry.name}{list(index)} is {entry.dtype}{list(block)}, not '
                     f'{array.dtype}{list(np.shape(array))}')
  data = np.ascontiguousarray(array, entry.dtype)
  if data.size == 0:
    return
  fd = fd if isinstance(fd, int) else fd.fileno()
  data_rows = data.reshape(-1).view(np.uint8).reshape(-1, run)
  done = 0
  for base in bases:
    for row in range(rows):
      view, offset = memoryview(data_rows[done]), base + row * stride
      while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written
      done += 1
