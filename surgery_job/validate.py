"""Checksums of every leaf, taken where the arrays live, to compare what was written with what
was computed without keeping both in memory.

A leaf's digest is two uint32 sums over its raw bits: the plain sum, which any single flipped bit
changes, and a sum weighted by odd position weights, which catches swapped or shifted data. Integer
sums are exact, so the digest does not depend on how the leaf is sharded.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from surgery_job import distributed, keys


def words(x: jax.Array) -> jax.Array:
  """The raw bits of `x` as uint32, in its own shape (8-byte items: a trailing axis of 2; typed
  PRNG keys: their key data)."""
  x = keys.data(x)
  if jnp.issubdtype(x.dtype, jnp.complexfloating):
    x = jnp.stack([x.real, x.imag], axis=-1)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  if x.dtype.itemsize == 8:
    return lax.bitcast_convert_type(x, jnp.uint32)
  return lax.bitcast_convert_type(x, jnp.dtype(f'uint{jax.dtypes.itemsize_bits(x.dtype)}')).astype(jnp.uint32)


def _odd_position_weights(shape) -> jax.Array:
  """2 * (row-major index) + 1, built per element so that no axis is gathered across devices."""
  index = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(len(shape))):
    index = index + lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride % 2**32)
    stride *= shape[axis]
  return 2 * index + 1


@jax.jit
def _digest(x: jax.Array) -> jax.Array:
  bits = words(x)
  weighted = bits * _odd_position_weights(bits.shape)
  return jnp.stack([jnp.sum(bits, dtype=jnp.uint32), jnp.sum(weighted, dtype=jnp.uint32)])


def digests(arrays: dict[str, jax.Array]) -> dict[str, tuple]:
  """{key: (shape, dtype, checksums)} of each array; every process gets the same values."""
  # One small program per leaf shape, dtype and sharding, reused from jit's cache by every leaf
  # alike: a single program over all leaves took minutes to compile for 10,000 of them. One
  # program at a time: on CPU, programs in flight together may pair their all-reduces up in another
  # order on each device, and hang (seen, with one process and with several). Converting to numpy
  # would hold the GIL for as long as the sums take.
  sums = {}
  for key, x in arrays.items():
    sums[key] = distributed.wait_ready(_digest(x))
  # Each result is replicated: every process holds a full copy.
  return {k: (arrays[k].shape, arrays[k].dtype.name, tuple(np.asarray(sums[k].addressable_data(0)).tolist()))
          for k in arrays}


def mismatches(expected: dict[str, tuple], actual: dict[str, tuple]) -> list[str]:
  """Keys whose shape, dtype or checksums differ, or that are missing."""
  return [k for k in expected if actual.get(k) != expected[k]]
