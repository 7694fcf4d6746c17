"""Typed PRNG keys (`jax.random.key` of any implementation) as ordinary leaves.

Orbax writes a typed key as its key data (uint32, the key's shape plus a trailing axis) and records the
implementation only in its array metadata files; `metadata()` reports the key data alone. The job reads
the implementation there and treats the leaf as the typed key it is: Orbax restores it as one, the ops
see its logical shape, and writing it back makes Orbax record it the same way, so a trainer restores it
as before.
"""

import asyncio
from typing import Any

import jax
from orbax.checkpoint._src.metadata import (
  array_metadata as array_metadata_lib,
  array_metadata_store,
)

from surgery_job import checkpoint, paths
from surgery_job.errors import SurgeryError


def is_key(dtype: Any) -> bool:
  return jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def implementations(item_dir: paths.Path, metadata: dict[str, Any]) -> dict[str, str]:
  """{key: PRNG implementation name} of the leaves of `metadata` that Orbax saved as typed keys."""
  try:
    stored = asyncio.run(array_metadata_store.Store().read(item_dir))
  except Exception as e:  # A damaged array metadata file, as any damaged input: one line naming it.
    raise SurgeryError(checkpoint.read_error(e, item_dir)) from None
  if not stored:
    return {}
  by_name = {getattr(m, 'name', None): key for key, m in metadata.items()}
  # Every process's file lists every array; the first one is enough, as in Orbax's own restore.
  found = {}
  for meta in next(iter(stored.values())):
    impl = (meta.ext_metadata or {}).get(array_metadata_lib.RANDOM_KEY_IMPL)
    if impl and meta.param_name in by_name:
      found[by_name[meta.param_name]] = impl
  return found


def key_dtype(impl: str) -> Any:
  return jax.eval_shape(lambda: jax.random.key(0, impl=impl)).dtype


def data_ndim(dtype: Any) -> int:
  """How many trailing axes the key data of one key of `dtype` has (1 for the built-in ones)."""
  return len(jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct((), dtype)).shape)


def data(x: jax.Array) -> jax.Array:
  """The raw bits a leaf is compared by: the key data of a typed key, else the array itself."""
  return jax.random.key_data(x) if is_key(x.dtype) else x
