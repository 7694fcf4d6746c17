"""Bit-for-bit comparison of the written checkpoint with the arrays the job computed."""

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def _bits(x: jax.Array) -> jax.Array:
  """The raw bits of `x`, so that NaNs and -0.0 compare as written."""
  if jnp.issubdtype(x.dtype, jnp.floating):
    return lax.bitcast_convert_type(x, jnp.dtype(f'uint{x.dtype.itemsize * 8}'))
  return x


@jax.jit
def _equal(expected: dict[str, jax.Array], actual: dict[str, jax.Array]) -> dict[str, jax.Array]:
  return {k: jnp.array_equal(_bits(expected[k]), _bits(actual[k])) for k in expected}


def mismatches(expected: dict[str, jax.Array], actual: dict[str, jax.Array]) -> list[str]:
  """Keys whose arrays differ in shape, dtype or any bit; the comparison runs on every shard."""
  keys = [k for k in expected if k not in actual or actual[k].shape != expected[k].shape
          or actual[k].dtype != expected[k].dtype]
  same = _equal({k: expected[k] for k in expected if k not in keys},
                {k: actual[k] for k in expected if k not in keys})
  # Each flag is a replicated scalar: every process holds a copy.
  return keys + [k for k, flag in same.items() if not bool(np.asarray(flag.addressable_data(0)))]
