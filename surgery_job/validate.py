"""Checksums of every leaf, taken where the arrays live, to compare what was written with what
was computed without keeping both in memory.

A leaf's digest is two uint32 sums over its raw bits: the plain sum, which any single flipped bit
changes, and a sum weighted by odd position weights, which catches swapped or shifted data. Integer
sums are exact, so the digest does not depend on how the leaf is sharded.
"""

import math

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


SMALL = 2 ** 16  # Elements; a smaller leaf weighs each element, a larger one each row and column.
BATCH = 16  # Small leaves of one kind digested by one program.


def _index_sum(bits: jax.Array) -> jax.Array:
  """sum(bits * row-major index) mod 2**32 (uint32 arithmetic wraps)."""
  if bits.size <= SMALL:
    # An index per element: the fewest operations, for leaves where each one's cost dominates.
    index = jnp.zeros(bits.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(bits.ndim)):
      index = index + lax.broadcasted_iota(jnp.uint32, bits.shape, axis) * jnp.uint32(stride % 2**32)
      stride *= bits.shape[axis]
    return jnp.sum(bits * index, dtype=jnp.uint32)
  # The index is the sum over axes of position * stride, so this is, for each axis, the positions
  # dotted with the sums of `bits` over the other axes: a few reductions instead of an index per
  # element, which cost three times the plain sum on 1 GiB.
  index_sum, stride = jnp.uint32(0), 1
  for axis in reversed(range(bits.ndim)):
    others = tuple(a for a in range(bits.ndim) if a != axis)
    marginal = jnp.sum(bits, axis=others, dtype=jnp.uint32)
    positions = lax.iota(jnp.uint32, bits.shape[axis])
    index_sum = index_sum + jnp.uint32(stride % 2**32) * jnp.sum(positions * marginal, dtype=jnp.uint32)
    stride *= bits.shape[axis]
  return index_sum


def _digest(x: jax.Array) -> jax.Array:
  bits = words(x)
  total = jnp.sum(bits, dtype=jnp.uint32)
  # sum(bits * (2 * index + 1)), the weighted sum.
  return jnp.stack([total, 2 * _index_sum(bits) + total])


@jax.jit
def _digest_batch(xs: tuple[jax.Array, ...]) -> jax.Array:
  """The digests of leaves of one shape, dtype and sharding: one row each."""
  return jnp.stack([_digest(x) for x in xs])


def digests(arrays: dict[str, jax.Array]) -> dict[str, tuple]:
  """{key: (shape, dtype, checksums)} of each array; every process gets the same values."""
  # Small leaves of one shape, dtype and sharding go through one program BATCH at a time (the last
  # batch padded with a leaf again), large ones one at a time: one small program per kind of leaf,
  # reused from jit's cache (a single program over all leaves took minutes to compile for 10,000
  # of them), and the cost of running a program spread over many small leaves. One program at a
  # time: on CPU, programs in flight together may pair their all-reduces up in another order on
  # each device, and hang (seen, with one process and with several). Converting to numpy would
  # hold the GIL for as long as the sums take.
  kinds = {}
  for key, x in arrays.items():
    kinds.setdefault((x.shape, x.dtype, x.sharding), []).append(key)
  sums = {}
  for (shape, _, _), names in kinds.items():
    size = 1 if math.prod(shape) > SMALL else BATCH
    for start in range(0, len(names), size):
      batch = names[start:start + size]
      padded = tuple(arrays[k] for k in batch) + (arrays[batch[-1]],) * (size - len(batch))
      # Each result is replicated: every process holds a full copy.
      rows = np.asarray(distributed.wait_ready(_digest_batch(padded)).addressable_data(0))
      sums.update({k: tuple(row.tolist()) for k, row in zip(batch, rows)})
  return {k: (arrays[k].shape, arrays[k].dtype.name, sums[k]) for k in arrays}


def mismatches(expected: dict[str, tuple], actual: dict[str, tuple]) -> list[str]:
  """Keys whose shape, dtype or checksums differ, or that are missing."""
  return [k for k in expected if actual.get(k) != expected[k]]
