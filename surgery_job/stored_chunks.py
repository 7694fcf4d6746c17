"""Output leaves that are an input leaf unchanged, copied as their stored chunks.

A leaf passed through unchanged (`OutputLeaf.passthrough`) whose stored chunks are what Orbax
writes for its output sharding (OCDBT, zarr v2 with zstd level 1, one chunk per shard, no shard
held twice) is copied as the compressed bytes of its zarr chunks: read from the input's OCDBT
database and written into the output's, never decoded or encoded. Each process copies a share of
the chunks into an OCDBT database of its own beside the output's, as Orbax's per-process writes
do; process 0 merges them into the output's database as Orbax's finalize does, and adds each
leaf's entries to `_METADATA`, `_sharding` and `array_metadatas/` as Orbax writes them.
Validation compares each copied chunk's stored bytes with the source's, not decoded values.

The layout is Orbax 0.12.8's (`orbax_speedups.VERSION`); with another Orbax every leaf goes
through the decode-encode path.
"""

import base64
import dataclasses
import json
import math
import zlib

import jax
import orbax.checkpoint as ocp
import tensorstore as ts
from orbax.checkpoint._src.metadata import sharding as sharding_metadata, tree as tree_metadata
from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils

from surgery_job import checkpoint, faults, orbax_speedups, paths, plan as plan_lib, storage, tree

_ZARR = {'compressor': {'id': 'zstd', 'level': 1}, 'dimension_separator': '.',
         'fill_value': None, 'filters': None, 'order': 'C', 'zarr_format': 2}
_DATABASE = 'ocdbt.copied_'  # Each process's database of copied chunks, beside Orbax's.
_BATCH_BYTES = 64 << 20  # Of chunks read, per process, before they are written: at most.


@dataclasses.dataclass(frozen=True)
class Copy:
  """One output leaf copied from an input leaf: where each is stored, and its Orbax metadata."""
  source_tree: str  # Prefix of `Location.trees()` of the input.
  source_name: str  # Orbax's storage name within that tree.
  tree: str  # The output tree it goes to (a prefix, as `Writer.finish` returns them).
  name: str  # Its storage name there.
  metadata_key: str  # Its `_METADATA` entry's key, as Orbax writes it.
  key_metadata: tuple  # That entry's `key_metadata`.
  write_shape: tuple[int, ...]
  chunk_bytes: int  # Of one chunk, decoded: what a batch counts for it.
  sharding: str  # Its `_sharding` entry, as Orbax serializes the output sharding.


def plan_copies(source: checkpoint.Location, plan: plan_lib.Plan, out_skeleton,
                out_trees: list[str], on_object_store: bool) -> dict[str, Copy]:
  """{output key: Copy} of the outputs copied as stored chunks. `out_trees`: the prefixes the
  output's trees will have (every one keeps a leaf that Orbax writes, so that its own metadata
  files are there to add to)."""
  if ocp.__version__ != orbax_speedups.VERSION or on_object_store:
    return {}
  trees = source.trees()
  if any(paths.on_object_store(folder) for folder in trees.values()):
    return {}
  wanted = {k: leaf.passthrough for k, leaf in plan.outputs.items() if leaf.passthrough}
  stored = {prefix: _stored(folder) for prefix, folder in trees.items()}
  abstract = {k: plan.abstract_output(k) for k in plan.outputs}
  keypaths = {jax.tree_util.keystr(path, simple=True, separator=tree.SEP): path for path, _ in
              jax.tree_util.tree_flatten_with_path(tree.unflatten(abstract, out_skeleton))[0]}
  copies = {}
  for key, source_key in wanted.items():
    source_tree, source_within = _split(source_key, list(trees))
    out_tree, within = _split(key, out_trees)
    found = stored[source_tree]
    name = storage.name(source_within)
    if found is None or name not in found:
      continue
    write_shape = _copyable(found[name], abstract[key])
    if write_shape is None:
      continue
    path = keypaths[key][1:] if out_tree else keypaths[key]
    key_metadata = tree_metadata.KeyMetadataEntry.build(path).to_json()
    sharding = sharding_metadata.from_jax_sharding(abstract[key].sharding)
    copies[key] = Copy(source_tree, name, out_tree, storage.name(within),
                       str(tuple(entry['key'] for entry in key_metadata)), key_metadata,
                       write_shape, math.prod(write_shape) * abstract[key].dtype.itemsize,
                       sharding.to_serialized_string())
  for out_tree in out_trees:  # Each output tree keeps its smallest leaf in Orbax's hands.
    keys = [k for k in plan.outputs if _split(k, out_trees)[0] == out_tree]
    if keys and all(k in copies for k in keys):
      del copies[min(keys, key=lambda k: plan.outputs[k].nbytes)]
  return copies


def _split(key: str, prefixes: list[str]) -> tuple[str, str]:
  """(tree prefix, key within that tree) of `key`, as `checkpoint.per_tree` splits it."""
  if '' in prefixes:
    return '', key
  prefix, _, rest = key.partition(tree.SEP)
  return prefix, rest


def _stored(item_dir: paths.Path) -> dict[str, dict] | None:
  """{storage name: what its files say} of the item's arrays saved as Orbax 0.12.8 saves a
  jax.Array (OCDBT, zarr v2); None when the item is in another layout."""
  try:
    metadata = json.loads((item_dir / '_METADATA').read_text())
    if not metadata.get('use_ocdbt') or metadata.get('use_zarr3'):
      return None
    entries = {}
    for entry in metadata['tree_metadata'].values():
      value = entry['value_metadata']
      if value.get('value_type') == 'jax.Array' and not value.get('skip_deserialize'):
        entries['.'.join(str(k['key']) for k in entry['key_metadata'])] = value
    files = sorted((item_dir / 'array_metadatas').glob('process_*'))
    arrays = {m['array_metadata']['param_name']: m['array_metadata'] for f in files
              for m in json.loads(f.read_text())['array_metadatas']}
    kvstore = ts.KvStore.open({'driver': 'ocdbt', 'base': paths.kvstore(item_dir)}).result()
    reads = {name: kvstore.read(f'{name}/.zarray') for name in entries}
    found = {}
    for name, read in reads.items():
      zarray = read.result()
      if zarray.state == 'value' and name in arrays:
        found[name] = {'zarray': json.loads(zarray.value), 'write_shape': entries[name].get('write_shape'),
                       'array': arrays[name]}
    return found
  except Exception:  # pylint: disable=broad-except  # Anything unexpected: Orbax's path.
    return None


def _copyable(found: dict, out: jax.ShapeDtypeStruct) -> tuple[int, ...] | None:
  """The write shape of a stored leaf whose chunks Orbax would write as they are for `out`: one
  chunk per shard, each shard on one device only; None otherwise."""
  shard = tuple(out.sharding.shard_shape(tuple(out.shape)))
  indices = out.sharding.devices_indices_map(tuple(out.shape)).values()
  if len({tuple((s.start, s.stop) for s in index) for index in indices}) != len(indices):
    return None  # Held by several devices: Orbax splits such a shard among them.
  zarray, array = found['zarray'], found['array']
  if {k: zarray.get(k) for k in _ZARR} != _ZARR or list(zarray.get('shape', ())) != list(out.shape):
    return None
  if array.get('ext_metadata') or not math.prod(shard):
    return None
  if not list(zarray['chunks']) == list(found['write_shape'] or ()) == list(array['write_shape']) \
      == list(array['chunk_shape']) == list(shard):
    return None
  return shard


def _database(folder: paths.Path, mode: str | None, context: ts.Context | None = None) -> ts.KvStore:
  """The OCDBT database in `folder`, opened as Orbax opens it to write (`WRITE`), to merge
  per-process databases into (`MERGE`, in the `context` they are opened in) or to read (None)."""
  options = None if mode is None else ts_utils.OcdbtKvStoreWriteOptions(ts_utils.OcdbtWriteMode[mode])
  spec = ts_utils.build_kvstore_tspec(str(folder), use_ocdbt=True, ocdbt_write_options=options)
  return ts.KvStore.open(spec, context=context or ts_utils.get_ts_context(use_ocdbt=True)).result()


def _reader(folder: paths.Path) -> ts.KvStore:
  return ts.KvStore.open({'driver': 'ocdbt', 'base': paths.kvstore(folder)}).result()


def _chunks(copies: dict[str, Copy], source: checkpoint.Location) -> list[tuple[str, str, str]]:
  """(output key, stored key in the input, stored key in the output) of every value of every
  copied leaf: its zarr header and its chunks."""
  stores = {prefix: _reader(folder) for prefix, folder in source.trees().items()}
  listed = {key: stores[c.source_tree].list(ts.KvStore.KeyRange(f'{c.source_name}/', f'{c.source_name}0'))
            for key, c in copies.items()}
  chunks = []
  for key in sorted(copies):
    name = copies[key].source_name
    for stored in sorted(listed[key].result()):  # The same order on every process.
      rest = stored.decode()[len(name):]
      chunks.append((key, name + rest, copies[key].name + rest))
  return chunks


def _batch_bytes(budget_bytes: int | None) -> int:
  """The bytes of chunks in a batch. A copy holds about three batches at once (the next one
  read, this one's values, tensorstore's buffers writing them): a third of the memory budget."""
  return _BATCH_BYTES if budget_bytes is None else max(1, min(_BATCH_BYTES, budget_bytes // 3))


def _batches(chunks: list, copies: dict[str, Copy], budget_bytes: int | None):
  """`chunks` (tuples starting with the output key) in runs of at most `_batch_bytes` (or one
  chunk), so that a process holds little of them at once."""
  batch, size, most = [], 0, _batch_bytes(budget_bytes)
  for chunk in chunks:
    chunk_bytes = copies[chunk[0]].chunk_bytes
    if batch and size + chunk_bytes > most:
      yield batch
      batch, size = [], 0
    batch.append(chunk)
    size += chunk_bytes
  if batch:
    yield batch


def copy(copies: dict[str, Copy], source: checkpoint.Location, out_trees: dict[str, paths.Path],
         barrier, budget_bytes: int | None) -> dict[tuple[str, str], int]:
  """Copies the stored chunks of `copies` into the finished output trees `out_trees` (every
  process its share, then process 0 merges them in and writes their metadata), in batches that
  fit the memory budget. Returns this process's share: {(output key, stored key in the output):
  checksum of the bytes copied}."""
  if not copies:
    return {}
  me, count = jax.process_index(), jax.process_count()
  sources = {prefix: _reader(folder) for prefix, folder in source.trees().items()}
  mine = _chunks(copies, source)[me::count]
  targets = {prefix: _database(folder / f'{_DATABASE}{me}', 'WRITE')
             for prefix, folder in out_trees.items() if any(copies[c[0]].tree == prefix for c in mine)}
  checksums, writing = {}, []
  for batch in _batches(mine, copies, budget_bytes):
    # The next batch is read while the last one is written: two batches in memory at most.
    reads = [sources[copies[key].source_tree].read(stored) for key, stored, _ in batch]
    for write in writing:
      write.result()
    writing = []
    for (key, _, name), read in zip(batch, reads):
      value = read.result().value
      checksums[key, name] = zlib.crc32(value)
      writing.append(targets[copies[key].tree].write(name, value))
  for write in writing:
    write.result()
  del targets
  faults.at('copying')
  barrier('chunks_copied')
  if me == 0:
    for prefix, folder in out_trees.items():
      leaves = [c for c in copies.values() if c.tree == prefix]
      if leaves:
        _merge(folder)
        _add_metadata(folder, leaves)
  barrier('copies_merged')
  return checksums


def _merge(folder: paths.Path) -> None:
  """The per-process databases of copied chunks merged into the tree's own, as Orbax's finalize
  merges its per-process databases: the tree's database refers to their files."""
  context = ts_utils.get_ts_context(use_ocdbt=True)
  parent = _database(folder, 'MERGE', context)
  children = [_database(child, None, context) for child in sorted(folder.glob(f'{_DATABASE}*'))]
  transaction = ts.Transaction(atomic=True)
  for child in children:
    child.experimental_copy_range_to(parent.with_transaction(transaction)).result()
  transaction.commit_async().result()


def _add_metadata(folder: paths.Path, leaves: list[Copy]) -> None:
  """Each copied leaf's entries in `_METADATA`, `_sharding` and every process's
  `array_metadatas/` file, as Orbax writes them for a jax.Array."""
  metadata = json.loads((folder / '_METADATA').read_text())
  for leaf in leaves:
    metadata['tree_metadata'][leaf.metadata_key] = {
        'key_metadata': list(leaf.key_metadata),
        'value_metadata': {'value_type': 'jax.Array', 'skip_deserialize': False,
                           'write_shape': list(leaf.write_shape)}}
  (folder / '_METADATA').write_text(json.dumps(metadata))
  shardings = json.loads((folder / '_sharding').read_text())
  shardings.update({base64.urlsafe_b64encode(leaf.name.encode()).decode(): leaf.sharding
                    for leaf in leaves})
  (folder / '_sharding').write_text(json.dumps(shardings))
  for file in sorted((folder / 'array_metadatas').glob('process_*')):
    arrays = json.loads(file.read_text())
    arrays['array_metadatas'] += [{'array_metadata': {
        'param_name': leaf.name, 'write_shape': list(leaf.write_shape),
        'chunk_shape': list(leaf.write_shape), 'ext_metadata': None}} for leaf in leaves]
    file.write_text(json.dumps(arrays))


def mismatches(copies: dict[str, Copy], out_trees: dict[str, paths.Path],
               checksums: dict[tuple[str, str], int], budget_bytes: int | None) -> list[str]:
  """The copied leaves whose stored values in the output (zarr header and chunks) that this
  process copied (`checksums`, as `copy` returned them) differ from what it read, or are missing
  or unreadable; and those whose number of stored values differs from the input's."""
  outputs = {prefix: _reader(folder) for prefix, folder in out_trees.items()}
  bad = set()
  for batch in _batches(sorted(checksums), copies, budget_bytes):
    reads = [outputs[copies[key].tree].read(name) for key, name in batch]
    bad |= {key for (key, name), read in zip(batch, reads) if _checksum(read) != checksums[key, name]}
  return sorted(bad)


def _checksum(read) -> int | None:
  """The checksum of what a pending read of a stored value gives; None if nothing."""
  try:
    found = read.result()
  except Exception:  # pylint: disable=broad-except  # A damaged database: the value is not there.
    return None
  return zlib.crc32(found.value) if found.state == 'value' else None
