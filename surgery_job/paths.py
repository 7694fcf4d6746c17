"""Every path the job reads or writes, on a local disk or an object store, as one type: etils
`epath`, which Orbax itself takes. `gs://bucket/run` and `/mnt/ckpt` go through the same calls;
the few things an object store does differently (no rename, no hard link, sizes and times from
the listing) are decided here, so the rest of the job never asks which one it has.

Small objects that must change atomically (the lock) are read and written through tensorstore's
key-value stores with a generation condition: a create that fails if the object exists, a
replace that fails if it changed since it was read. The `file` and `gcs` drivers both keep that
promise, so the lock is the same code on both.
"""

import os
import shutil
from typing import TypeAlias, Union

import fsspec
import tensorstore as ts
from etils import epath

from surgery_job.errors import SurgeryError

PathLike = Union[str, os.PathLike]
OBJECT_STORES = ('gs://',)  # Where a folder cannot be renamed: output is committed by a marker.


class _ObjectStoreBackend(type(epath.backend.fsspec_backend)):
  """gs:// through fsspec, with an object store's folders: a folder is any prefix, there once an
  object is under it and gone with its last one. etils' fsspec backend treats folders as a disk
  does (a rename needs its target's folder to exist; deleting a folder that is already empty
  fails), and Orbax's partial-save merge, which renames into folders it has only just "made" and
  then deletes the emptied ones, fails on it."""

  def rename(self, path: PathLike, dst: PathLike) -> None:
    if self.exists(dst):
      raise FileExistsError(f'{dst} already exists. Cannot rename {path}.')
    # Each object copied, then deleted: not atomic, which the output protocol allows for.
    self.fs(path).mv(os.fspath(path), os.fspath(dst), recursive=True)

  def replace(self, path: PathLike, dst: PathLike) -> None:
    self.fs(path).mv(os.fspath(path), os.fspath(dst), recursive=True)

  def rmtree(self, path: PathLike) -> None:
    try:
      super().rmtree(path)
    except FileNotFoundError:
      pass  # No object under it: on an object store, no folder either.


_OBJECT_STORE_BACKEND = _ObjectStoreBackend()
# Listings fresh every time: Orbax writes arrays through tensorstore and other processes write
# too, none of which a cached listing would see.
fsspec.config.conf.setdefault('gs', {})['use_listings_cache'] = False


@epath.register_path_cls(OBJECT_STORES)
class _ObjectStorePath(epath.gpath.PosixGPath):
  """What `epath.Path('gs://...')` gives in this process, Orbax's own paths included."""

  @property
  def _backend(self):
    return _OBJECT_STORE_BACKEND


Path: TypeAlias = epath.Path

# Orbax 0.12.8 has no array path for these (it fails with "Checkpoint path should be absolute").
_UNSUPPORTED = {'s3://': 'Orbax has no s3:// array path in this version (tensorstore\'s s3 driver '
                         'would need an endpoint in each spec that Orbax does not let a caller set)'}


def of(path: PathLike, what: str = 'path') -> Path:
  """`path` as the job's path type: local paths made absolute, `gs://` kept as it is. `what` names
  the field in the error for a scheme the job cannot use."""
  text = os.fspath(path)
  for scheme, why in _UNSUPPORTED.items():
    if text.startswith(scheme):
      raise SurgeryError(f'{what} {text}: {scheme} is not supported: {why}; use gs:// or a '
                         'mounted local path')
  if '://' in text:
    if not text.startswith(OBJECT_STORES):
      raise SurgeryError(f'{what} {text}: unsupported scheme (supported: local paths, '
                         f'{", ".join(OBJECT_STORES)})')
    return Path(text.rstrip('/'))
  return Path(os.path.abspath(text))


def on_object_store(path: PathLike) -> bool:
  return os.fspath(path).startswith(OBJECT_STORES)


def real(path: PathLike) -> str:
  """A name that is the same for every way of writing the same place (symlinks resolved)."""
  return str(path) if on_object_store(path) else os.path.realpath(path)


def is_link(path: PathLike) -> bool:
  """A symbolic link (an object store has none)."""
  return not on_object_store(path) and os.path.islink(path)


def inside(path: PathLike, parent: PathLike) -> bool:
  path, parent = real(path).rstrip('/'), real(parent).rstrip('/')
  return path == parent or path.startswith(parent + '/')


def size(path: Path) -> int:
  return os.stat(path).st_size if not on_object_store(path) else path.stat().length


def _filesystem(path: PathLike):
  return epath.backend.fsspec_backend.fs(path)


def files(folder: Path) -> list[Path]:
  """Every file under `folder`, at any depth: one listing on an object store."""
  if on_object_store(folder):
    return [Path(f'gs://{name}') for name in _filesystem(folder).find(os.fspath(folder))]
  return [Path(top) / name for top, _, names in os.walk(folder) for name in names]


def listing(folder: Path) -> dict[str, tuple[bool, int]]:
  """{name: (is a folder, size)} of what is directly in `folder` ({} where there is none): one
  request on an object store, where asking each entry would be one or more each."""
  if on_object_store(folder):
    try:
      found = _filesystem(folder).ls(os.fspath(folder), detail=True)
    except FileNotFoundError:
      return {}
    return {entry['name'].rstrip('/').rsplit('/', 1)[-1]: (entry['type'] == 'directory',
                                                           entry.get('size') or 0)
            for entry in found if entry['name'].rstrip('/') != os.fspath(folder)[5:].rstrip('/')}
  try:
    with os.scandir(folder) as entries:
      return {e.name: (e.is_dir(), 0 if e.is_dir() else e.stat().st_size) for e in entries}
  except (FileNotFoundError, NotADirectoryError):
    return {}


def remove_tree(folder: Path) -> None:
  """Deletes `folder` and everything under it, if it is there; what another process deletes
  meanwhile is no error."""
  if on_object_store(folder):
    folder.rmtree()  # The object-store backend takes a missing folder as deleted.
    return

  def gone_already(function, path, error):
    del function, path
    if not issubclass(error[0], FileNotFoundError):
      raise error[1]
  shutil.rmtree(folder, onerror=gone_already)


def is_file(path: Path) -> bool:
  """One request on an object store (epath's asks twice: exists, then not a folder)."""
  return path.exists() if on_object_store(path) else os.path.isfile(path)


def move(source: Path, destination: Path) -> None:
  """Moves one file; on an object store the copy is made by the store, no data comes through."""
  if on_object_store(source):
    _filesystem(source).mv(os.fspath(source), os.fspath(destination))
  else:
    destination.parent.mkdir(parents=True, exist_ok=True)
    os.replace(source, destination)


def copy_tree(source: Path, destination: Path) -> None:
  """Copies every file under `source` to the same place under `destination`."""
  for file in files(source):
    target = destination / file.relative_to(source)
    target.parent.mkdir(parents=True, exist_ok=True)
    file.copy(target)


def kvstore(folder: PathLike) -> str:
  """tensorstore's URL of the key-value store rooted at `folder`."""
  text = os.fspath(folder)
  return f'{text.rstrip("/")}/' if on_object_store(text) else f'file://{os.path.abspath(text)}/'


class Lease:
  """One small object changed only under a generation condition: it is created only where there
  is none, and replaced or deleted only while it is still what this process last read or wrote."""

  def __init__(self, path: Path):
    self.path = path
    self._store = ts.KvStore.open(kvstore(path.parent)).result()
    self.generation = None  # Of what this process last read or wrote.

  def read(self) -> bytes | None:
    """The object's bytes, None where there is none; remembers its generation."""
    result = self._store.read(self.path.name).result()
    self.generation = result.stamp.generation
    return result.value if result.state == 'value' else None

  def write_if_unchanged(self, data: bytes | None) -> bool:
    """Writes `data` (None: deletes) if the object is still as last read or written; whether it
    was."""
    stamp = self._store.write(self.path.name, data, if_equal=self.generation).result()
    if not stamp.generation:  # The condition failed: someone else changed it.
      return False
    self.generation = stamp.generation
    return True


def stamps(path: Path) -> dict[str, list]:
  """{file under `path` (or `path` itself): what changes when it is rewritten}: its size and, on a
  disk, modification time and inode; on an object store, its generation. One listing, no data
  read."""
  if on_object_store(path):
    found = _filesystem(path).find(os.fspath(path), detail=True)
    return {name: [info.get('size'), info.get('generation'), info.get('updated'), info.get('crc32c')]
            for name, info in sorted(found.items())}
  if os.path.isfile(path):
    info = os.stat(path)
    return {'': [info.st_size, info.st_mtime_ns, info.st_ino]}
  found, pending = {}, ['']
  while pending:
    folder = pending.pop()
    with os.scandir(os.path.join(path, folder)) as entries:
      for entry in entries:
        name = f'{folder}/{entry.name}' if folder else entry.name
        if entry.is_dir():
          pending.append(name)
        else:
          info = entry.stat()
          found[name] = [info.st_size, info.st_mtime_ns, info.st_ino]
  return dict(sorted(found.items()))


def write_whole(path: Path, text: str) -> None:
  """Writes `path` so that a reader finds the old text or the new, never a part: on a disk through
  a temporary file renamed over it (a write cut short by a full disk or a kill leaves only that
  file); an object store's upload is all or nothing."""
  if on_object_store(path):
    path.write_text(text)
    return
  partial = f'{path}.writing'
  with open(partial, 'w') as f:
    f.write(text)
  os.replace(partial, path)
