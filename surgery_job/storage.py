"""What an Orbax checkpoint item holds on disk, read with tensorstore: the names of its arrays, and
the data file that holds one stored value. `_METADATA` is checked against the first; a read error
names the second."""

from pathlib import Path

import tensorstore as ts

_ARRAY_KEYS = ('/.zarray', '/zarr.json')  # Each array's zarr v2 or v3 metadata key.


def name(key: str) -> str:
  """Orbax's storage name for a '/'-joined key: the same parts joined with '.'."""
  return key.replace('/', '.')


def _file_store(directory: Path) -> dict:
  return {'driver': 'file', 'path': f'{directory}/'}


def array_names(item_dir: Path) -> set[str]:
  """The storage names of every array the item holds (in its OCDBT database, or as folders)."""
  spec = _file_store(item_dir)
  if (item_dir / 'manifest.ocdbt').exists():
    spec = {'driver': 'ocdbt', 'base': spec}
  keys = ts.KvStore.open(spec).result().list().result()
  return {key.decode()[:-len(suffix)] for key in keys for suffix in _ARRAY_KEYS
          if key.decode().endswith(suffix)}


def value_file(database: Path, key: str) -> Path | None:
  """The data file of the OCDBT database in `database` that holds `key`'s value, found through its
  B+tree; None when the value is stored inline or the key is absent."""
  base = ts.KvStore.open(_file_store(database)).result()
  location = ts.ocdbt.dump(base).result()['versions'][-1]['root'].get('location')
  target, prefix = key.encode(), b''
  while location:
    node = ts.ocdbt.dump(base, location).result()
    if node['height'] == 0:
      reference = next((e.get('indirect_value') for e in node['entries']
                        if prefix + e['key'] == target), None)
      if reference is None:
        return None
      # `value:<base path>:<relative path>:<offset>:<length>`
      _, base_path, relative_path = reference.rsplit(':', 2)[0].split(':', 2)
      return database / base_path / relative_path
    # Interior entries hold each child's first key; a child's keys omit its common prefix.
    below = [e for e in node['entries'] if prefix + e['key'] <= target]
    if not below:
      return None
    prefix += below[-1].get('subtree_common_prefix', b'')
    location = below[-1]['location']
  return None
