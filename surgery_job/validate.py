"""Checksums of every leaf, taken where the arrays live, to compare what was written with what
was computed without keeping both in memory.

A leaf's digest is two uint32 sums over its raw bits: the plain sum, which any single flipped bit
changes, and a sum weighted by odd position weights, which catches swapped or shifted data. Integer
sums are exact, so the digest does not depend on how the leaf is sharded.
"""

import math
import threading

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


SMALL = 2 ** 16  # Elements; a smaller leaf weighs each element, a larger one each row.
BATCH = 16  # Small leaves of one kind digested by one program.


def _index(shape: tuple[int, ...]) -> jax.Array:
  """Each element's row-major index in `shape`, mod 2**32."""
  index, stride = jnp.zeros(shape, jnp.uint32), 1
  for axis in reversed(range(len(shape))):
    index = index + lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride % 2**32)
    stride *= shape[axis]
  return index


def _sums(bits: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(sum(bits), sum(bits * row-major index)) mod 2**32 (uint32 arithmetic wraps)."""
  if bits.size <= SMALL:
    # An index per element: the fewest operations, for leaves where each one's cost dominates.
    return jnp.sum(bits, dtype=jnp.uint32), jnp.sum(bits * _index(bits.shape), dtype=jnp.uint32)
  # The index is (index of the element's row) * (row length) + (position in the row), so both
  # sums follow from each row's plain sum and position-weighted sum, taken by one reduction of the
  # two together: one pass over the data. An index per element, a pass per axis, or two separate
  # row sums (XLA then writes the raw bits out first) cost 4 to 20 times as much on 1 GiB.
  zero = jnp.uint32(0)
  row_sums, row_weighted = lax.reduce(
      (bits, bits * lax.broadcasted_iota(jnp.uint32, bits.shape, bits.ndim - 1)), (zero, zero),
      lambda a, b: (a[0] + b[0], a[1] + b[1]), (bits.ndim - 1,))
  index_sum = (jnp.uint32(bits.shape[-1] % 2**32)
               * jnp.sum(row_sums * _index(row_sums.shape), dtype=jnp.uint32)
               + jnp.sum(row_weighted, dtype=jnp.uint32))
  return jnp.sum(row_sums, dtype=jnp.uint32), index_sum


def _digest(x: jax.Array) -> jax.Array:
  total, index_sum = _sums(words(x))
  # sum(bits * (2 * index + 1)), the weighted sum.
  return jnp.stack([total, 2 * index_sum + total])


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
  sums = {}
  for (shape, _, _), names in _kinds(arrays).items():
    size = _batch_size(shape)
    for start in range(0, len(names), size):
      batch = names[start:start + size]
      padded = tuple(arrays[k] for k in batch) + (arrays[batch[-1]],) * (size - len(batch))
      # Each result is replicated: every process holds a full copy.
      rows = np.asarray(distributed.wait_ready(_digest_batch(padded)).addressable_data(0))
      sums.update({k: tuple(row.tolist()) for k, row in zip(batch, rows)})
  return {k: (arrays[k].shape, arrays[k].dtype.name, sums[k]) for k in arrays}


_compiled = set()  # The kinds of leaves `compile_ahead` compiled for.


def compile_ahead(arrays: dict[str, jax.ShapeDtypeStruct]) -> threading.Thread:
  """Starts compiling, in a thread, the programs `digests` will run on arrays like these, so that
  compiling (about 0.15 s a kind of leaf on a CPU) overlaps reading them. Join it before `digests`:
  a program compiled there in the meantime would be compiled twice."""
  kinds = set(_kinds(arrays)) - _compiled
  _compiled.update(kinds)

  def compile_all():
    for shape, dtype, sharding in kinds:
      try:
        _digest_batch.lower((jax.ShapeDtypeStruct(shape, dtype, sharding=sharding),)
                            * _batch_size(shape)).compile()
      except Exception:  # pylint: disable=broad-except
        pass  # `digests` compiles it again, and says what is wrong.

  thread = threading.Thread(target=compile_all, name='surgery_job_compile', daemon=True)
  thread.start()
  return thread



def _kinds(arrays: dict) -> dict[tuple, list[str]]:
  """{(shape, dtype, sharding): keys}: the leaves one digest program serves."""
  kinds = {}
  for key, x in arrays.items():
    kinds.setdefault((x.shape, x.dtype, x.sharding), []).append(key)
  return kinds


def _batch_size(shape: tuple[int, ...]) -> int:
  return 1 if math.prod(shape) > SMALL else BATCH


def mismatches(expected: dict[str, tuple], actual: dict[str, tuple]) -> list[str]:
  """Keys whose shape, dtype or checksums differ, or that are missing."""
  return [k for k in expected if actual.get(k) != expected[k]]
