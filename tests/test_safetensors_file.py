"""The safetensors codec against the `safetensors` package: the same bytes as its writer, every
damaged file refused with one line, blocks read and written equal to numpy slicing, and
transformers' split into shard files."""

import io
import json
import os
import struct

import jax
import ml_dtypes
import numpy as np
import pytest
from etils import epath
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from surgery_job.errors import SurgeryError
from surgery_job.formats import safetensors_file as st


def random_array(rng, dtype, shape) -> np.ndarray:
  """Every bit pattern of `dtype` can occur (NaNs included): the bytes are what is compared."""
  dtype = np.dtype(dtype)
  if dtype == np.bool_:
    return rng.integers(0, 2, size=shape).astype(np.bool_)
  raw = rng.integers(0, 256, size=int(np.prod(shape)) * dtype.itemsize, dtype=np.uint8)
  return raw.view(dtype).reshape(shape)


def many_tensors(seed: int = 0) -> dict[str, np.ndarray]:
  """Every dtype; 0-d, empty and 1- to 4-d shapes; names whose order by dtype and by name
  differ, and names that sort by code point, not by UTF-16 unit ('ﬀ' U+FB00 < '𝐱' U+1D431)."""
  rng = np.random.default_rng(seed)
  shapes = [(), (0,), (3, 0, 2), (7,), (3, 5), (2, 3, 4), (2, 1, 3, 2)]
  tensors = {}
  for k, (name, dtype) in enumerate(st.DTYPES.items()):
    for prefix in ('a', 'model.layers.0.w', 'Z', 'é', 'ﬀ', '𝐱'):
      tensors[f'{prefix}.{name.lower()}'] = random_array(rng, dtype, shapes[(k + len(prefix)) % 7])
  return tensors


def assemble(path, tensors: dict[str, np.ndarray], metadata=None) -> None:
  header, entries = st.encode([(n, a.dtype, a.shape) for n, a in tensors.items()], metadata)
  with open(path, 'wb') as f:
    f.write(header)
    for name, array in tensors.items():
      f.seek(entries[name].offset)
      f.write(np.ascontiguousarray(array).tobytes())


@pytest.mark.parametrize('metadata', [None, {}, {'format': 'pt'}])
def test_encode_gives_the_bytes_of_save_file(tmp_path, metadata):
  tensors = many_tensors()
  save_file(tensors, tmp_path / 'theirs.safetensors', metadata=metadata)
  assemble(tmp_path / 'ours.safetensors', tensors, metadata)
  assert ((tmp_path / 'ours.safetensors').read_bytes()
          == (tmp_path / 'theirs.safetensors').read_bytes())


def test_several_metadata_keys_are_sorted_and_read_back(tmp_path):
  tensors = {'x': np.arange(3, dtype=np.int16)}
  metadata = {'z': '1', 'a': 'ü', 'format': 'pt'}
  assemble(tmp_path / 'ours.safetensors', tensors, metadata)
  header = (tmp_path / 'ours.safetensors').read_bytes()[8:]
  assert header.startswith(b'{"__metadata__":{"a":"\xc3\xbc","format":"pt","z":"1"},')
  with safe_open(tmp_path / 'ours.safetensors', 'numpy') as f:
    assert f.metadata() == metadata
  assert st.read_header(tmp_path / 'ours.safetensors')[1] == metadata


def test_dtype_names_are_those_safetensors_writes(tmp_path):
  for name, dtype in st.DTYPES.items():
    save_file({'x': np.zeros((2,), dtype)}, tmp_path / 'one.safetensors')
    data = (tmp_path / 'one.safetensors').read_bytes()
    written = json.loads(data[8:8 + struct.unpack('<Q', data[:8])[0]])
    assert written['x']['dtype'] == name
    assert st.dtype_name(dtype) == name
    if not name.startswith('F8'):  # safetensors.numpy asks numpy itself for np.float8_*.
      assert load_file(tmp_path / 'one.safetensors')['x'].dtype == dtype
  assert st.dtype_name(np.dtype('>f4')) == 'F32'


@pytest.mark.parametrize('dtype, shown', [
    (ml_dtypes.int4, 'int4'), (np.complex128, 'complex128'), (np.dtype('U3'), '<U3'),
    (jax.random.key(0).dtype, 'key<fry>')])
def test_a_dtype_safetensors_lacks_is_refused(dtype, shown):
  with pytest.raises(SurgeryError) as e:
    st.dtype_name(dtype)
  assert str(e.value) == (f'dtype {shown} has no safetensors equivalent (safetensors stores BOOL, '
                          'U8, I8, F8_E5M2, F8_E4M3, F8_E8M0, F8_E4M3FNUZ, F8_E5M2FNUZ, I16, U16, '
                          'F16, BF16, I32, U32, F32, C64, F64, I64, U64)')


def test_read_header_gives_what_encode_planned(tmp_path):
  tensors = many_tensors(1)
  save_file(tensors, tmp_path / 'm.safetensors', metadata={'format': 'pt'})
  entries, metadata = st.read_header(tmp_path / 'm.safetensors')
  planned = st.encode([(n, a.dtype, a.shape) for n, a in tensors.items()], {'format': 'pt'})[1]
  assert entries == planned and metadata == {'format': 'pt'}
  assert list(entries) == sorted(entries, key=lambda n: entries[n].offset)
  data = (tmp_path / 'm.safetensors').read_bytes()
  for name, entry in entries.items():
    assert data[entry.offset:entry.offset + entry.nbytes] == tensors[name].tobytes()
  assert st.read_header(str(tmp_path / 'm.safetensors')) == (entries, metadata)
  assert st.read_header(epath.Path(tmp_path) / 'm.safetensors') == (entries, metadata)


def test_read_header_reads_only_the_header(tmp_path):
  save_file({'big': np.zeros((1 << 20,), np.float32)}, tmp_path / 'm.safetensors')
  reads = []

  class Counting(io.FileIO):
    def readinto(self, buffer):
      reads.append((self.tell(), len(buffer)))
      return super().readinto(buffer)

  with Counting(tmp_path / 'm.safetensors') as f:
    st.read_header(f)
  length = struct.unpack('<Q', (tmp_path / 'm.safetensors').read_bytes()[:8])[0]
  assert reads == [(0, 8), (8, length)]


def raw_file(path, header, data: bytes = b'', length: int | None = None):
  """A file with `header` (an object, or bytes as they are) after its 8-byte length."""
  text = header if isinstance(header, bytes) else json.dumps(header).encode()
  path.write_bytes(struct.pack('<Q', len(text) if length is None else length) + text + data)
  return path


def f32(begin, end, shape):
  return {'dtype': 'F32', 'shape': shape, 'data_offsets': [begin, end]}


BAD_FILES = [
    ('short', lambda p: p.write_bytes(b'\x01\x00'), '2 bytes, too short for the 8-byte header length'),
    ('length_past_end', lambda p: raw_file(p, {}, length=40), 'header length 40 runs past the end of the file (10 bytes)'),
    ('length_huge', lambda p: raw_file(p, {}, length=1 << 62), 'header length 4611686018427387904 is over safetensors\' limit of 100000000 bytes'),
    ('json_broken', lambda p: raw_file(p, b'{"a": '), 'header is not valid JSON: Expecting value: line 1 column 7 (char 6)'),
    ('not_utf8', lambda p: raw_file(p, b'{"\xff": 1}'), 'header is not valid JSON: \'utf-8\' codec can\'t decode byte 0xff in position 2: invalid start byte'),
    ('json_list', lambda p: raw_file(p, [1, 2]), 'header is a JSON list, not an object'),
    ('metadata', lambda p: raw_file(p, {'__metadata__': {'a': 1}}), '__metadata__ is not an object of strings: {"a": 1}'),
    ('no_offsets', lambda p: raw_file(p, {'w': {'dtype': 'F32', 'shape': []}}), 'tensor \'w\': {"dtype": "F32", "shape": []} is not an object with dtype, shape and data_offsets'),
    ('dtype', lambda p: raw_file(p, {'w': {'dtype': 'F12', 'shape': [2], 'data_offsets': [0, 1]}}, b'\0'), 'tensor \'w\': unknown dtype "F12" (known: BOOL, U8, I8, F8_E5M2, F8_E4M3, F8_E8M0, F8_E4M3FNUZ, F8_E5M2FNUZ, I16, U16, F16, BF16, I32, U32, F32, C64, F64, I64, U64)'),
    ('dtype_packed', lambda p: raw_file(p, {'w': {'dtype': 'F4', 'shape': [2], 'data_offsets': [0, 1]}}, b'\0'), 'tensor \'w\': dtype F4 packs several values into a byte; the job reads BOOL, U8, I8, F8_E5M2, F8_E4M3, F8_E8M0, F8_E4M3FNUZ, F8_E5M2FNUZ, I16, U16, F16, BF16, I32, U32, F32, C64, F64, I64, U64'),
    ('shape_negative', lambda p: raw_file(p, {'w': f32(0, 4, [-1])}, b'\0' * 4), 'tensor \'w\': shape [-1] is not a list of non-negative integers'),
    ('shape_float', lambda p: raw_file(p, {'w': f32(0, 8, [2.0])}, b'\0' * 8), 'tensor \'w\': shape [2.0] is not a list of non-negative integers'),
    ('shape_text', lambda p: raw_file(p, {'w': f32(0, 8, '2')}, b'\0' * 8), 'tensor \'w\': shape "2" is not a list of non-negative integers'),
    ('offsets_reversed', lambda p: raw_file(p, {'w': f32(8, 0, [2])}, b'\0' * 8), 'tensor \'w\': data_offsets [8, 0] are not [begin, end] with 0 <= begin <= end'),
    ('size', lambda p: raw_file(p, {'w': f32(0, 12, [2, 2])}, b'\0' * 12), 'tensor \'w\': shape [2, 2] of F32 is 16 bytes but data_offsets [0, 12] hold 12'),
    ('overlap', lambda p: raw_file(p, {'a': f32(0, 8, [2]), 'b': f32(4, 12, [2])}, b'\0' * 12), 'tensor \'b\': data_offsets [4, 12] overlap those of \'a\''),
    ('gap', lambda p: raw_file(p, {'a': f32(0, 8, [2]), 'b': f32(12, 16, [1])}, b'\0' * 16), 'tensor \'b\': bytes 8 to 12 of the data, before it, belong to no tensor'),
    ('gap_first', lambda p: raw_file(p, {'a': f32(4, 8, [1])}, b'\0' * 8), 'tensor \'a\': bytes 0 to 4 of the data, before it, belong to no tensor'),
    ('truncated', lambda p: raw_file(p, {'a': f32(0, 8, [2]), 'b': f32(8, 16, [2])}, b'\0' * 13), 'tensor \'b\': data_offsets [8, 16] run past the end of the file, whose data holds 13 bytes (a truncated file?)'),
    ('uncovered', lambda p: raw_file(p, {'a': f32(0, 8, [2])}, b'\0' * 11), 'the last 3 bytes of the file belong to no tensor'),
    ('twice', lambda p: raw_file(p, b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}', b'\0' * 8), 'tensor \'a\': listed twice in the header'),
]


@pytest.mark.parametrize('make, expected', [case[1:] for case in BAD_FILES],
                         ids=[case[0] for case in BAD_FILES])
def test_a_damaged_file_is_refused_with_one_line(tmp_path, make, expected):
  path = tmp_path / 'm.safetensors'
  make(path)
  with pytest.raises(SurgeryError) as e:
    st.read_header(path)
  assert str(e.value) == f'safetensors file {path}: {expected}'


@pytest.mark.parametrize('make', [case[1] for case in BAD_FILES if case[0] != 'dtype_packed'],
                         ids=[case[0] for case in BAD_FILES if case[0] != 'dtype_packed'])
def test_safetensors_itself_refuses_each_damaged_file(tmp_path, make):
  """The cases above are damaged by safetensors' own rules, not only by ours."""
  make(tmp_path / 'm.safetensors')
  with pytest.raises(Exception, match='Error while deserializing header'):
    safe_open(tmp_path / 'm.safetensors', 'numpy')


def test_a_header_safetensors_accepts_is_accepted(tmp_path):
  """Empty tensors anywhere, spaces after the JSON, data in any order in the header."""
  header = (b'{"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]},"e":{"dtype":"I8","shape":[0],'
            b'"data_offsets":[4,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}   ')
  path = raw_file(tmp_path / 'm.safetensors', header, np.array([1, 2], np.float32).tobytes())
  entries, metadata = st.read_header(path)
  assert list(entries) == ['a', 'e', 'b'] and metadata == {}
  assert {n: a.tolist() for n, a in load_file(path).items()} == {'a': [1.0], 'b': [2.0], 'e': []}
  assert st.read_block(path, entries['b'], ()).tolist() == [2.0]


def random_block(rng, shape) -> tuple[slice, ...]:
  """Some dims whole (so that inner dims coalesce), others cut anywhere, sometimes empty."""
  index = []
  for size in shape:
    if rng.random() < 0.4:
      index.append(slice(None))
    else:
      start = int(rng.integers(0, size + 1))
      index.append(slice(start, int(rng.integers(start, size + 1))))
  return tuple(index[:int(rng.integers(0, len(shape) + 1))] if rng.random() < 0.2 else index)


SHAPES = [(), (1,), (17,), (6, 9), (4, 1, 7), (3, 5, 2, 4), (40, 3)]


def test_read_block_equals_numpy_slicing(tmp_path):
  rng = np.random.default_rng(2)
  tensors = {f't{k}_{name}': random_array(rng, dtype, SHAPES[k % len(SHAPES)])
             for k, (name, dtype) in enumerate(list(st.DTYPES.items()) * 2)}
  save_file(tensors, tmp_path / 'm.safetensors')
  entries, _ = st.read_header(tmp_path / 'm.safetensors')
  with st.Reader(tmp_path / 'm.safetensors') as reader, \
       open(tmp_path / 'm.safetensors', 'rb') as file:
    for name, array in tensors.items():
      for _ in range(15):
        index = random_block(rng, array.shape)
        for source in (reader, file, tmp_path / 'm.safetensors'):
          block = st.read_block(source, entries[name], index)
          assert block.dtype == array.dtype and block.shape == array[index].shape
          assert block.tobytes() == array[index].tobytes(), (name, index)


class CountingReader(st.Reader):
  def __init__(self, path, max_gap):
    super().__init__(path)
    self.max_gap, self.reads = max_gap, []

  def read_into(self, offset, buffer):
    self.reads.append((offset, memoryview(buffer).nbytes))
    super().read_into(offset, buffer)


def test_read_block_reads_contiguous_bytes_once_and_rows_each_once(tmp_path):
  x = np.arange(64 * 32 * 4, dtype=np.float32).reshape(64, 32, 4)
  save_file({'x': x}, tmp_path / 'm.safetensors')
  entry = st.read_header(tmp_path / 'm.safetensors')[0]['x']
  cases = [((slice(8, 16),), [(entry.offset + 8 * 512, 8 * 512)]),  # Whole inner dims: one read.
           ((slice(3, 4), slice(5, 9)), [(entry.offset + 3 * 512 + 5 * 16, 64)]),
           ((slice(2, 5), slice(0, 2)), [(entry.offset + r * 512, 32) for r in (2, 3, 4)])]
  for index, reads in cases:
    reader = CountingReader(tmp_path / 'm.safetensors', max_gap=0)
    with reader:
      assert np.array_equal(st.read_block(reader, entry, index), x[index])
    assert reader.reads == reads, index
  with open(tmp_path / 'm.safetensors', 'rb') as file:
    reader = CountingReader(file, max_gap=1 << 16)
    assert np.array_equal(st.read_block(reader, entry, (slice(2, 5), slice(0, 2))), x[2:5, :2])
  assert reader.reads == [(entry.offset + 2 * 512, 2 * 512 + 32)]  # Neighbours merged.


def test_a_truncated_tensor_is_refused_when_read(tmp_path):
  save_file({'x': np.zeros((4, 4), np.float32)}, tmp_path / 'm.safetensors')
  entry = st.read_header(tmp_path / 'm.safetensors')[0]['x']
  size = os.path.getsize(tmp_path / 'm.safetensors')
  os.truncate(tmp_path / 'm.safetensors', size - 10)
  assert st.read_block(tmp_path / 'm.safetensors', entry, (slice(0, 2),)).shape == (2, 4)
  with pytest.raises(SurgeryError) as e:
    st.read_block(tmp_path / 'm.safetensors', entry, (slice(2, 4),))
  assert str(e.value) == (f'safetensors file {tmp_path / "m.safetensors"}: tensor \'x\': the file '
                          f'ends at byte {size - 10}, before byte {size} (a truncated file?)')


def grid(rng, shape) -> list[tuple[slice, ...]]:
  """`shape` cut along every dim at random places: blocks that tile the tensor."""
  cuts = []
  for size in shape:
    inner = sorted(set(rng.integers(1, size, size=int(rng.integers(0, 3))).tolist())) if size > 1 else []
    bounds = [0] + inner + [size]
    cuts.append([slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])])
  return [tuple(c[i] for c, i in zip(cuts, at)) for at in np.ndindex(*(len(c) for c in cuts))]


def test_a_file_written_block_by_block_in_any_order_is_save_files(tmp_path):
  rng = np.random.default_rng(3)
  tensors = {f't{k}': random_array(rng, dtype, SHAPES[k % len(SHAPES)])
             for k, dtype in enumerate(list(st.DTYPES.values()) * 2)}
  tensors['empty'] = np.zeros((3, 0), np.float32)
  save_file(tensors, tmp_path / 'theirs.safetensors', metadata={'format': 'pt'})
  header, entries = st.encode([(n, a.dtype, a.shape) for n, a in tensors.items()], {'format': 'pt'})
  writes = [(name, index) for name, array in tensors.items() for index in grid(rng, array.shape)]
  fd = os.open(tmp_path / 'ours.safetensors', os.O_WRONLY | os.O_CREAT)
  try:
    os.pwrite(fd, header, 0)
    for k in rng.permutation(len(writes)):
      name, index = writes[k]
      block = tensors[name][index]
      if block.ndim >= 2 and rng.random() < 0.5:  # A transposed view, made back by .T: not C order.
        block = np.ascontiguousarray(block.T).T
      elif rng.random() < 0.3 and block.dtype.itemsize > 1 and block.dtype.kind in 'iuf':
        block = block.astype(block.dtype.newbyteorder('>'))
      st.write_block(fd, entries[name], index, block)
  finally:
    os.close(fd)
  assert ((tmp_path / 'ours.safetensors').read_bytes()
          == (tmp_path / 'theirs.safetensors').read_bytes())


def test_write_block_refuses_a_block_of_another_shape_dtype_or_step(tmp_path):
  _, entries = st.encode([('x', np.float32, (4, 4))])
  with open(tmp_path / 'f', 'wb') as f:
    with pytest.raises(ValueError):
      st.write_block(f, entries['x'], (slice(0, 2),), np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError):
      st.write_block(f, entries['x'], (slice(0, 2),), np.zeros((2, 4), np.float64))
    with pytest.raises(ValueError):
      st.write_block(f, entries['x'], (slice(0, 4, 2),), np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError):
      st.write_block(f, entries['x'], (slice(0, 2),) * 3, np.zeros((2, 2), np.float32))


def test_gs_reads_the_header_then_only_the_block(gs_path, tmp_path, monkeypatch):
  x = np.arange(100 * 30, dtype=np.float32).reshape(100, 30)
  save_file({'x': x, 'b': np.ones(3, np.int8)}, tmp_path / 'm.safetensors', metadata={'format': 'pt'})
  (gs_path / 'm.safetensors').write_bytes((tmp_path / 'm.safetensors').read_bytes())
  fs = epath.backend.fsspec_backend.fs(str(gs_path))
  ranges = []
  cat_file = fs.cat_file

  def counting(path, start=None, end=None, **kwargs):
    ranges.append((start, end))
    return cat_file(path, start=start, end=end, **kwargs)

  monkeypatch.setattr(fs, 'cat_file', counting)
  entries, metadata = st.read_header(gs_path / 'm.safetensors')
  assert (entries, metadata) == st.read_header(tmp_path / 'm.safetensors')
  length = entries['x'].offset - 8
  assert ranges == [(0, 8), (8, 8 + length)]
  ranges.clear()
  block = st.read_block(gs_path / 'm.safetensors', entries['x'], (slice(10, 20), slice(5, 25)))
  assert np.array_equal(block, x[10:20, 5:25])
  start = entries['x'].offset + (10 * 30 + 5) * 4
  assert ranges == [(start, start + (9 * 30 + 20) * 4)]  # Rows 120 bytes apart: one read.


def test_shard_files_splits_as_transformers(tmp_path):
  # huggingface_hub serialization/_base.py split_state_dict_into_shards_factory, which
  # transformers' save_pretrained calls: its docstring's example first ([6, 6, 2, 6, 2, 2] GB in
  # 10 GB files: [6], [6+2], [6+2+2]).
  sizes = list(zip('abcdef', [6, 6, 2, 6, 2, 2]))
  assert st.shard_files(sizes, 10) == [['a'], ['b', 'c'], ['d', 'e', 'f']]
  # A tensor over the limit gets a file of its own, before the file being filled.
  assert st.shard_files([('a', 2), ('big', 12), ('c', 3), ('d', 10)], 10) == [
      ['big'], ['a', 'c'], ['d']]
  # Exactly the limit fits; empty tensors go where they come; no tensors, no file.
  assert st.shard_files([('a', 5), ('b', 5), ('e', 0), ('c', 1)], 10) == [['a', 'b', 'e'], ['c']]
  assert st.shard_files([], 10) == []
  assert st.file_names(1) == ['model.safetensors']
  assert st.file_names(3) == ['model-00001-of-00003.safetensors', 'model-00002-of-00003.safetensors',
                              'model-00003-of-00003.safetensors']


def test_index_json_is_save_pretrained_s():
  # transformers modeling_utils.py save_pretrained: json.dumps(index, indent=2, sort_keys=True) + "\n".
  text = st.index_json({'z.w': 'model-00002-of-00002.safetensors',
                        'a.w': 'model-00001-of-00002.safetensors'}, 1234, total_parameters=300)
  assert text == ('{\n  "metadata": {\n    "total_parameters": 300,\n    "total_size": 1234\n  },\n'
                  '  "weight_map": {\n    "a.w": "model-00001-of-00002.safetensors",\n'
                  '    "z.w": "model-00002-of-00002.safetensors"\n  }\n}\n')
  assert json.loads(st.index_json({}, 0)) == {'metadata': {'total_size': 0}, 'weight_map': {}}


def sharded_folder(folder, tensors: dict[str, np.ndarray], max_shard_size: int) -> dict[str, str]:
  files = st.shard_files([(n, a.nbytes) for n, a in tensors.items()], max_shard_size)
  weight_map = {}
  for file, names in zip(st.file_names(len(files)), files):
    save_file({n: tensors[n] for n in names}, folder / file, metadata={'format': 'pt'})
    weight_map.update({n: file for n in names})
  (folder / st.INDEX).write_text(st.index_json(weight_map, sum(a.nbytes for a in tensors.values())))
  return weight_map


def test_read_index_gives_the_weight_map(tmp_path):
  tensors = {f'layers.{i}.w': np.full((4, 4), i, np.float32) for i in range(5)}
  weight_map = sharded_folder(tmp_path, tensors, 130)
  assert len(set(weight_map.values())) == 3
  assert st.read_index(tmp_path) == weight_map
  assert st.read_index(str(tmp_path)) == weight_map


def edit_index(folder, change):
  index = json.loads((folder / st.INDEX).read_text())
  change(index['weight_map'])
  (folder / st.INDEX).write_text(json.dumps(index))


def truncate_to_header(path):
  os.truncate(path, 8 + struct.unpack('<Q', path.read_bytes()[:8])[0])


BAD_INDEXES = [
    ('broken', lambda d: (d / st.INDEX).write_text('{"weight_map": {'), 'not valid JSON: Expecting property name enclosed in double quotes: line 1 column 17 (char 16)'),
    ('no_map', lambda d: (d / st.INDEX).write_text('{"metadata": {}}'), 'no "weight_map" object of file names'),
    ('missing_file', lambda d: (d / 'model-00002-of-00003.safetensors').unlink(), 'tensor \'layers.2.w\': its file model-00002-of-00003.safetensors does not exist'),
    ('wrong_file', lambda d: edit_index(d, lambda m: m.update({'layers.0.w': 'model-00002-of-00003.safetensors'})), 'tensor \'layers.0.w\': the index puts it in model-00002-of-00003.safetensors, whose header does not list it'),
    ('unknown_tensor', lambda d: edit_index(d, lambda m: m.update({'extra': 'model-00001-of-00003.safetensors'})), 'tensor \'extra\': the index puts it in model-00001-of-00003.safetensors, whose header does not list it'),
    ('twice_in_files', lambda d: save_file({'layers.0.w': np.zeros(1, np.float32), 'layers.4.w': np.zeros(1, np.float32)}, d / 'model-00003-of-00003.safetensors'), 'tensor \'layers.0.w\' is in both model-00001-of-00003.safetensors and model-00003-of-00003.safetensors'),
    ('twice_in_index', lambda d: (d / st.INDEX).write_text('{"weight_map": {"a": "x", "a": "y"}}'), '\'a\' is listed twice'),
    ('damaged_file', lambda d: truncate_to_header(d / 'model-00003-of-00003.safetensors'), None),
]


@pytest.mark.parametrize('damage, expected', [case[1:] for case in BAD_INDEXES],
                         ids=[case[0] for case in BAD_INDEXES])
def test_a_bad_index_is_refused_with_one_line(tmp_path, damage, expected):
  sharded_folder(tmp_path, {f'layers.{i}.w': np.full((4, 4), i, np.float32) for i in range(5)}, 130)
  damage(tmp_path)
  with pytest.raises(SurgeryError) as e:
    st.read_index(tmp_path)
  if expected is None:  # The file's own check names it.
    assert str(e.value) == (f'safetensors file {tmp_path / "model-00003-of-00003.safetensors"}: '
                            'tensor \'layers.4.w\': data_offsets [0, 64] run past the end of the '
                            'file, whose data holds 0 bytes (a truncated file?)')
  else:
    assert str(e.value) == f'safetensors index {tmp_path / st.INDEX}: {expected}'


def test_read_index_on_gs(gs_path, tmp_path):
  weight_map = sharded_folder(tmp_path, {f'w{i}': np.full((4,), i, np.int64) for i in range(4)}, 64)
  for file in tmp_path.iterdir():
    (gs_path / file.name).write_bytes(file.read_bytes())
  assert st.read_index(gs_path) == weight_map
  (gs_path / 'model-00002-of-00002.safetensors').unlink()
  with pytest.raises(SurgeryError) as e:
    st.read_index(gs_path)
  assert str(e.value) == (f'safetensors index {gs_path / st.INDEX}: tensor \'w2\': its file '
                          'model-00002-of-00002.safetensors does not exist')
