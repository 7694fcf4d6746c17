"""What a cast lost, per leaf: the largest absolute and relative error, and how many values
overflowed to inf or NaN or were flushed to zero. Measured inside the group's jitted transform on
the cast's own source and result, so no extra data is read or kept."""

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax import lax

from surgery_job.errors import SurgeryError


def statistics(source: jax.Array, result: jax.Array) -> dict[str, jax.Array]:
  """Scalars comparing a cast's `result` with its `source`, both taken in a wide type (counts are
  int64: the job runs with x64 on, and a leaf may hold more than 2**31 values)."""
  try:
    wide = jnp.promote_types(jnp.promote_types(source.dtype, result.dtype), jnp.float32)
  except jax.dtypes.TypePromotionError:  # Sub-byte integers (int4) promote to nothing: exact in f32.
    wide = jnp.float32
  if source.ndim == 0:
    source, result = source[None], result[None]
  before, after = source.astype(wide), result.astype(wide)
  finite = jnp.isfinite(before) & jnp.isfinite(after)
  error = jnp.where(finite, jnp.abs(after - before), 0)
  magnitude = jnp.abs(before)
  relative = jnp.where(finite & (magnitude > 0), error / jnp.where(magnitude > 0, magnitude, 1), 0)
  overflowed = (jnp.isfinite(before) & ~jnp.isfinite(after)).astype(jnp.int64)
  flushed = ((before != 0) & (after == 0)).astype(jnp.int64)
  # One reduction of the four together over each row: XLA fuses the elementwise work into it. Four
  # separate reductions made XLA write the wide copies, masks and int64 counts out first, about 2.5
  # times the source leaf (a 320 MiB float32 leaf cast to bfloat16 peaked 0.79 GiB higher).
  zero, none = jnp.zeros((), wide), jnp.zeros((), jnp.int64)
  rows = lax.reduce((error, relative, overflowed, flushed), (zero, zero, none, none),
                    lambda a, b: (jnp.maximum(a[0], b[0]), jnp.maximum(a[1], b[1]),
                                  a[2] + b[2], a[3] + b[3]), (source.ndim - 1,))
  return {'max_abs_error': jnp.max(rows[0], initial=0).astype(jnp.float32),
          'max_rel_error': jnp.max(rows[1], initial=0).astype(jnp.float32),
          'overflowed': jnp.sum(rows[2], dtype=jnp.int64),
          'flushed_to_zero': jnp.sum(rows[3], dtype=jnp.int64)}


def summarize(casts, stats: dict[str, dict[str, jax.Array]]) -> dict[str, dict]:
  """{leaf key: plain numbers} from one group's `statistics`, keyed by index into `casts`."""
  found = {}
  for index, values in stats.items():
    leaf = casts[int(index)]
    numbers = {name: np.asarray(x.addressable_data(0)).item() for name, x in values.items()}
    found[leaf.key] = {'dtype': leaf.dtype, **numbers}
    if numbers['overflowed'] and not leaf.allow_overflow:
      raise SurgeryError(f'cast of {leaf.key!r} to {leaf.dtype}: {numbers["overflowed"]} finite '
                         'values became inf or NaN; set allow_overflow=True on the op to accept it')
    if jax.process_index() == 0:
      logging.vlog(1, 'Cast %s to %s: max abs error %.3g, max rel error %.3g, %d overflowed, '
                   '%d flushed to zero.', leaf.key, leaf.dtype, numbers['max_abs_error'],
                   numbers['max_rel_error'], numbers['overflowed'], numbers['flushed_to_zero'])
  return found

