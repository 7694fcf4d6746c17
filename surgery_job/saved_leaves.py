"""Every leaf's shape, dtype, saved spec and PRNG implementation, read straight from the files
Orbax writes: `_METADATA` (the tree), `_sharding`, `array_metadatas/` and the zarr headers in the
OCDBT database, all at once.

Orbax's own `metadata()` opens each array in tensorstore one by one: about 8 s for 10,000 leaves
here; `read_files` reads the same facts in about half a second. It knows the default layout only
(OCDBT, zarr v2 or v3); `read` falls back to Orbax's reader for anything else, and for a damaged
checkpoint, whose error Orbax's reader names.
"""

import base64
import dataclasses
import json

import jax.numpy as jnp
import tensorstore as ts
from jax.sharding import PartitionSpec
from orbax.checkpoint._src.metadata import array_metadata as array_metadata_lib

from surgery_job import checkpoint, keys, paths, sharding, tree

ARRAY_TYPES = ('jax.Array', 'np.ndarray', 'scalar')


@dataclasses.dataclass(frozen=True)
class SavedLeaf:
  shape: tuple[int, ...]
  dtype: jnp.dtype
  spec: PartitionSpec
  mesh: dict[str, int] | None  # {axis: size} of the mesh it was saved on; None: not a NamedSharding.
  prng_impl: str | None  # A typed PRNG key saved as its key data (the shape and dtype above).


def read(item_dir: paths.Path) -> dict[str, SavedLeaf]:
  """{'/'-joined key: SavedLeaf} of the PyTree checkpoint at `item_dir`."""
  try:
    found = read_files(item_dir)
  except Exception:  # pylint: disable=broad-except  # Damaged: Orbax's reader says where.
    found = None
  return found if found is not None else read_with_orbax(item_dir)


def read_with_orbax(item_dir: paths.Path) -> dict[str, SavedLeaf]:
  """The same, through Orbax's `metadata()` (one tensorstore open per leaf)."""
  metadata = tree.flatten(checkpoint.read_metadata(checkpoint.Location(item_dir, None, None)))
  impls = keys.implementations(item_dir, metadata)
  leaves = {}
  for key, meta in metadata.items():
    named = hasattr(meta.sharding, 'axis_names')
    mesh = dict(zip(meta.sharding.axis_names, (int(s) for s in meta.sharding.shape))) if named else None
    leaves[key] = SavedLeaf(tuple(int(d) for d in meta.shape), jnp.dtype(meta.dtype),
                            sharding.saved_spec(meta), mesh, impls.get(key))
  return leaves


def read_files(item_dir: paths.Path) -> dict[str, SavedLeaf] | None:
  """The same, from the files; None when they are not in the layout this knows."""
  metadata = json.loads((item_dir / '_METADATA').read_text())
  if not metadata.get('use_ocdbt'):
    return None
  header = 'zarr.json' if metadata.get('use_zarr3') else '.zarray'
  names = {}
  for entry in metadata['tree_metadata'].values():
    value_type = entry['value_metadata']['value_type']
    if value_type == 'None':
      continue
    if value_type not in ARRAY_TYPES:
      return None
    parts = [str(k['key']) for k in entry['key_metadata']]
    names[tree.SEP.join(parts)] = '.'.join(parts)
  kvstore = ts.KvStore.open({'driver': 'ocdbt', 'base': paths.kvstore(item_dir)}).result()
  reads = {key: kvstore.read(f'{name}/{header}') for key, name in names.items()}
  sharding_file = item_dir / '_sharding'
  shardings = json.loads(sharding_file.read_text()) if sharding_file.is_file() else {}
  impls = _prng_impls(item_dir)
  leaves = {}
  for key, name in names.items():
    found = reads[key].result()
    if found.state != 'value':
      return None
    zarr = json.loads(found.value)
    dtype = jnp.dtype(zarr['data_type'] if header == 'zarr.json' else zarr['dtype'])
    saved = shardings.get(base64.urlsafe_b64encode(name.encode()).decode())
    sharding = json.loads(saved) if saved else {}
    named = sharding.get('sharding_type') == 'NamedSharding'
    spec = PartitionSpec(*[tuple(e) if isinstance(e, list) else e
                           for e in sharding.get('partition_spec', [])]) if named else PartitionSpec()
    mesh = dict(zip(sharding['axis_names'], sharding['shape'])) if named else None
    leaves[key] = SavedLeaf(tuple(zarr['shape']), dtype, spec, mesh, impls.get(name))
  return leaves


def _prng_impls(item_dir: paths.Path) -> dict[str, str]:
  """{param name: PRNG implementation} of the typed keys; each process's file lists every array."""
  files = sorted((item_dir / 'array_metadatas').glob('process_*'))
  if not files:
    return {}
  entries = json.loads(files[0].read_text())['array_metadatas']
  return {m['array_metadata']['param_name']: impl for m in entries
          if (impl := (m['array_metadata'].get('ext_metadata') or {}).get(
              array_metadata_lib.RANDOM_KEY_IMPL))}
