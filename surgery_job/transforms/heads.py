"""Ops that know attention heads: one axis of N*D values as N heads of D, and the two orders of the
rotary embedding's pairs within a head. Moments follow, as they do every structural op.

Attention kernels are stored fused, `(E, N*D)` as Hugging Face keeps them, or per head, `(E, N, D)`
as MaxText does; grouped-query attention's kv heads are heads like any other, never repeated or
reordered. A rotary embedding rotates pairs of a head's D values: interleaved pairs (2j, 2j+1), as
Meta's Llama and MaxText's LLaMARotaryEmbedding do, or halves (j, j + D/2), as Hugging Face's
`rotate_half` does; moving a query or key kernel from one to the other permutes its head_dim axis.
"""

import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec

from surgery_job.errors import SurgeryError
from surgery_job.transforms.core import Leaf, Op, normalize_axis, whole_tree
from surgery_job.transforms.shape import per_leaf

ROTARY_LAYOUTS = ('interleaved', 'halves')


def _entries(spec: PartitionSpec | None, ndim: int) -> list | None:
  return None if spec is None else list(spec) + [None] * (ndim - len(spec))


def _names(entry) -> tuple:
  """The mesh axes of one spec entry (None, a name, or a tuple of names)."""
  return () if entry is None else tuple(entry) if isinstance(entry, tuple) else (entry,)


@whole_tree
def split_heads(pattern: str, axis: int, heads: int, allow_empty: bool = False) -> Op:
  """Splits axis `axis` of N*D values into N `heads` then D.

  `(E, N*D)` -> `(E, N, D)` with axis=1. Its sharding goes to the heads axis."""
  if heads < 1:
    raise SurgeryError(f'heads must be positive, got {heads}')

  def change(key, leaf, _):
    x = leaf.value
    ax = normalize_axis(axis, x.ndim, key)
    if x.shape[ax] % heads:
      raise SurgeryError(f'axis {ax} of {key!r} (size {x.shape[ax]}) does not divide into '
                         f'{heads} heads')
    shape = x.shape[:ax] + (heads, x.shape[ax] // heads) + x.shape[ax + 1:]
    entries = _entries(leaf.spec, x.ndim)
    spec = None if entries is None else PartitionSpec(*entries[:ax + 1], None, *entries[ax + 1:])
    return Leaf(x.reshape(shape), spec)
  return per_leaf('split_heads', pattern, allow_empty, change)


@whole_tree
def merge_heads(pattern: str, axis: int, allow_empty: bool = False) -> Op:
  """Merges the heads axis `axis` and the head_dim axis after it into one.

  `(E, N, D)` -> `(E, N*D)` with axis=1. The merged axis is sharded as the two were, heads major."""
  def change(key, leaf, _):
    x = leaf.value
    ax = normalize_axis(axis, x.ndim, key)
    if ax == x.ndim - 1:
      raise SurgeryError(f'axis {ax} of {key!r} is its last: no head_dim axis follows it to merge')
    shape = x.shape[:ax] + (x.shape[ax] * x.shape[ax + 1],) + x.shape[ax + 2:]
    entries = _entries(leaf.spec, x.ndim)
    spec = None
    if entries is not None:
      merged = _names(entries[ax]) + _names(entries[ax + 1])
      spec = PartitionSpec(*entries[:ax], merged[0] if len(merged) == 1 else merged or None,
                           *entries[ax + 2:])
    return Leaf(x.reshape(shape), spec)
  return per_leaf('merge_heads', pattern, allow_empty, change)


@whole_tree
def rotary(pattern: str, to: str, axis: int = -1, allow_empty: bool = False) -> Op:
  """Permutes a head_dim axis between rotary layouts: `to='halves'` or `to='interleaved'`.

  On axis `axis`, `to='halves'` takes the even positions then the odd ones (interleaved pairs to
  halves), `to='interleaved'` the inverse."""
  if to not in ROTARY_LAYOUTS:
    raise SurgeryError(f"rotary: to must be one of {', '.join(map(repr, ROTARY_LAYOUTS))}, got {to!r}")

  def change(key, leaf, _):
    x = leaf.value
    ax = normalize_axis(axis, x.ndim, key)
    size = x.shape[ax]
    if size % 2:
      raise SurgeryError(f'rotary of {key!r}: head_dim axis {ax} has odd size {size}')
    if to == 'halves':
      out = jnp.concatenate([lax.slice_in_dim(x, 0, size, 2, ax), lax.slice_in_dim(x, 1, size, 2, ax)],
                            axis=ax)
    else:
      first, second = lax.slice_in_dim(x, 0, size // 2, axis=ax), lax.slice_in_dim(x, size // 2, size, axis=ax)
      out = jnp.stack([first, second], axis=ax + 1).reshape(x.shape)
    return Leaf(out, leaf.spec)
  return per_leaf('rotary', pattern, allow_empty, change)
