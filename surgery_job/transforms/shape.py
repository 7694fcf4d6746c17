"""Ops that change one parameter's shape: reshape, transpose, pad, slice. Moments follow."""

import math
from typing import Callable, Sequence

import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec

from surgery_job.errors import SurgeryError
from surgery_job.transforms.core import (
  Leaf,
  Op,
  State,
  check_init,
  check_mirror_shapes,
  check_numeric,
  fill,
  matches,
  normalize_axis,
  structural,
  whole_tree,
)


def per_leaf(name: str, pattern: str, allow_empty: bool,
              change: Callable[[str, Leaf, bool], Leaf]) -> Op:
  """An op that replaces each matching leaf by `change(key, leaf, is_mirror)`."""
  def apply(state: State) -> State:
    keys = [key for key, _ in matches(state.params, pattern, allow_empty)]
    check_mirror_shapes(state, keys, name)
    return structural(state, lambda tree, is_mirror: {
        k: change(k, leaf, is_mirror) if k in keys else leaf for k, leaf in tree.items()})
  return apply


@whole_tree
def reshape(pattern: str, shape: Sequence[int], allow_empty: bool = False) -> Op:
  """Reshapes the leaves `pattern` matches (and their moments) to `shape`."""
  shape = tuple(int(s) for s in shape)

  def change(key, leaf, _):
    old = leaf.value.shape
    known = math.prod(s for s in shape if s != -1)
    if shape.count(-1) > 1 or (-1 in shape and (known == 0 or math.prod(old) % known)) or (
        -1 not in shape and known != math.prod(old)):
      raise SurgeryError(f'cannot reshape {key!r} from {old} to {shape}')
    return Leaf(leaf.value.reshape(shape), None)
  return per_leaf('reshape', pattern, allow_empty, change)


@whole_tree
def transpose(pattern: str, axes: Sequence[int], allow_empty: bool = False) -> Op:
  """Permutes the axes of the leaves `pattern` matches by `axes`; their specs follow."""
  axes = tuple(int(a) for a in axes)

  def change(key, leaf, _):
    ndim = leaf.value.ndim
    if sorted(a % ndim if -ndim <= a < ndim else a for a in axes) != list(range(ndim)):
      raise SurgeryError(f'axes {axes} are not a permutation of the {ndim} axes of {key!r}')
    spec = None
    if leaf.spec is not None:
      entries = tuple(leaf.spec) + (None,) * (ndim - len(leaf.spec))
      spec = PartitionSpec(*(entries[a] for a in axes))
    return Leaf(jnp.transpose(leaf.value, axes), spec)
  return per_leaf('transpose', pattern, allow_empty, change)


@whole_tree
def pad(pattern: str, axis: int, size: int, init: str = 'zeros', stddev: float = 0.02,
        seed: int = 0, allow_empty: bool = False) -> Op:
  """Grows axis `axis` of the leaves `pattern` matches to `size`, new values by `init`."""
  check_init(init, ('zeros', 'normal', 'truncated_normal', 'mean'))

  def change(key, leaf, is_mirror):
    check_numeric(key, leaf, 'pad')
    x = leaf.value
    ax = normalize_axis(axis, x.ndim, key)
    if size < x.shape[ax]:
      raise SurgeryError(f'cannot pad {key!r} axis {ax} from {x.shape[ax]} to smaller size {size}')
    new_shape = x.shape[:ax] + (size - x.shape[ax],) + x.shape[ax + 1:]
    if is_mirror or init == 'zeros':
      new = jnp.zeros(new_shape, x.dtype)
    elif init == 'mean':
      mean = jnp.mean(x.astype(jnp.float32), axis=ax, keepdims=True)
      new = jnp.broadcast_to(mean, new_shape).astype(x.dtype)
    else:
      new = fill(init, new_shape, x.dtype, key=key, stddev=stddev, seed=seed)
    return Leaf(jnp.concatenate([x, new], axis=ax), leaf.spec)
  return per_leaf('pad', pattern, allow_empty, change)


@whole_tree
def slice_(pattern: str, axis: int, start: int, stop: int, allow_empty: bool = False) -> Op:
  """Keeps `start:stop` of axis `axis` of the leaves `pattern` matches.

  The `slice` op (named so as not to hide the builtin)."""
  def change(key, leaf, _):
    x = leaf.value
    ax = normalize_axis(axis, x.ndim, key)
    begin, end, _ = slice(start, stop).indices(x.shape[ax])
    if end <= begin:
      raise SurgeryError(f'slice [{start}:{stop}] of {key!r} axis {ax} (size {x.shape[ax]}) is empty')
    return Leaf(lax.slice_in_dim(x, begin, end, axis=ax), leaf.spec)
  return per_leaf('slice', pattern, allow_empty, change)
