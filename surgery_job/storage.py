"""What an Orbax checkpoint item holds on disk, read with tensorstore: the names of its arrays, and
the data files that hold their values. `_METADATA` is checked against the first, the files'
presence and sizes against the second, before any data moves; a read error names the file."""

from typing import Any, Iterator

import jax
import tensorstore as ts

from surgery_job import paths

_ARRAY_KEYS = ('/.zarray', '/zarr.json')  # Each array's zarr v2 or v3 metadata key.


def name(key: str) -> str:
  """Orbax's storage name for a '/'-joined key: the same parts joined with '.'."""
  return key.replace('/', '.')


def names(tree: Any) -> set[str]:
  """Orbax's storage name of each leaf of `tree`: its key parts joined with '.', as they are
  (a part may hold '/', which `name` cannot tell from a separator)."""
  return {jax.tree_util.keystr(path, simple=True, separator='.')
          for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


def is_ocdbt(item_dir: paths.Path) -> bool:
  return (item_dir / 'manifest.ocdbt').exists()


def array_names(item_dir: paths.Path) -> set[str]:
  """The storage names of every array the item holds (in its OCDBT database, or as folders)."""
  spec = paths.kvstore(item_dir)
  if is_ocdbt(item_dir):
    spec = {'driver': 'ocdbt', 'base': spec}
  keys = ts.KvStore.open(spec).result().list().result()
  return {key.decode()[:-len(suffix)] for key in keys for suffix in _ARRAY_KEYS
          if key.decode().endswith(suffix)}


def stored_values(database: paths.Path) -> Iterator[tuple[str, paths.Path, int]]:
  """(key, data file, end offset) of each value the OCDBT database in `database` keeps outside its
  B+tree, walking the tree of its latest version."""
  base = ts.KvStore.open(paths.kvstore(database)).result()
  root = ts.ocdbt.dump(base).result()['versions'][-1]['root']
  pending = [(root['location'], b'')] if 'location' in root else []
  while pending:
    location, prefix = pending.pop()
    node = ts.ocdbt.dump(base, location).result()
    for entry in node['entries']:
      if node['height'] > 0:  # A child's keys omit the prefix common to its subtree.
        pending.append((entry['location'], prefix + entry.get('subtree_common_prefix', b'')))
      elif 'indirect_value' in entry:
        # `value:<base path>:<relative path>:<offset>:<length>`
        reference, offset, length = entry['indirect_value'].rsplit(':', 2)
        _, base_path, relative_path = reference.split(':', 2)
        yield ((prefix + entry['key']).decode(), database / base_path / relative_path,
               int(offset) + int(length))


def damaged_file(item_dir: paths.Path) -> str | None:
  """A data file of the item that is missing or shorter than the values it holds, said in words;
  None when every file is there and long enough."""
  if not is_ocdbt(item_dir):
    return None
  ends = {}
  for key, path, end in stored_values(item_dir):
    if end > ends.get(path, (0, ''))[0]:
      ends[path] = (end, key)
  folders = {}  # One listing per data folder, not a request or more per file.
  for path, (end, key) in sorted(ends.items()):
    array = key.rsplit('/', 1)[0]
    if path.parent not in folders:
      folders[path.parent] = paths.listing(path.parent)
    is_dir, size = folders[path.parent].get(path.name, (True, 0))
    if is_dir:
      return f'checkpoint file {path} is missing (it holds array {array!r})'
    if size < end:
      return (f'checkpoint file {path} is truncated: {size} bytes, array {array!r} '
              f'needs {end}')
  return None
