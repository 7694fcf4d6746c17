"""Ops that turn several parameters into one or one into several: stack, unstack, split, concat.

These convert unscanned layers to scanned (`stack`) and back (`unstack`), and split or fuse QKV.
Moments follow the same way.
"""

from typing import Sequence

import jax.numpy as jnp
from jax.sharding import PartitionSpec

from surgery_job.errors import SurgeryError
from surgery_job.transforms.core import (
  Leaf,
  Op,
  State,
  Tree,
  check_mirror_shapes,
  expand,
  matches,
  normalize_axis,
  structural,
  whole_tree,
)


def _spec_entries(leaf: Leaf, ndim: int) -> list | None:
  return None if leaf.spec is None else list(leaf.spec) + [None] * (ndim - len(leaf.spec))


def _merge(tree: Tree, groups: dict[str, list[str]], combine) -> Tree:
  """Replaces each group's keys by `combine(leaves)` under the group's target, where its first key was.

  An optimizer mirror may hold state for only some params (NNX moments of `nnx.Param`s only): a group
  it holds none of is skipped; one it holds part of cannot be combined."""
  held = {target: [k for k in keys if k in tree] for target, keys in groups.items()}
  for target, keys in held.items():
    if keys and len(keys) < len(groups[target]):
      raise SurgeryError(f'optimizer state holds {keys[0]!r} but not all the parts of {target!r}; '
                         'add drop_optimizer first')
  groups = {target: keys for target, keys in groups.items() if held[target]}
  first = {keys[0]: target for target, keys in groups.items()}
  consumed = {key for keys in groups.values() for key in keys}
  out = {}
  for key, leaf in tree.items():
    if key in first:
      out[first[key]] = combine([tree[k] for k in groups[first[key]]])
    elif key not in consumed:
      out[key] = leaf
  return out


def _check_free(state: State, targets, consumed, op: str) -> None:
  for target in targets:
    if target in state.params and target not in consumed:
      raise SurgeryError(f'{op} target {target!r} collides with an existing parameter')


def _check_same(state: State, keys: Sequence[str], target: str, skip_axis: int | None = None) -> None:
  leaves = [state.params[k].value for k in keys]
  shapes = {tuple(s for i, s in enumerate(x.shape) if i != skip_axis) for x in leaves}
  dtypes = {x.dtype for x in leaves}
  if len(shapes) > 1 or len(dtypes) > 1 or len({x.ndim for x in leaves}) > 1:
    found = ', '.join(f'{k} {x.shape} {x.dtype}' for k, x in zip(keys, leaves))
    raise SurgeryError(f'cannot combine into {target!r}: mismatched shapes or dtypes: {found}')


def _check_count(sizes: dict[str, int], count: int | None, op: str, axis: int) -> None:
  """Every leaf one stack or unstack matches must have the same number of layers (`count` if set):
  unstacking on the wrong axis otherwise gives each leaf a different, silent, layer count."""
  if not sizes or set(sizes.values()) == {count if count is not None else next(iter(sizes.values()))}:
    return
  by_size: dict[int, list[str]] = {}
  for key, size in sizes.items():
    by_size.setdefault(size, []).append(key)
  found = '; '.join(f'{size} layers: {", ".join(keys[:3])}' + (
      f' (+{len(keys) - 3} more)' if len(keys) > 3 else '') for size, keys in by_size.items())
  wanted = f'count={count}' if count is not None else 'one layer count'
  raise SurgeryError(f'{op} on axis {axis}: the leaves it matches do not agree on {wanted}: {found}')


@whole_tree
def stack(pattern: str, replacement: str, axis: int = 0, count: int | None = None,
          allow_empty: bool = False) -> Op:
  """Stacks numbered layers on a new axis: the first group of `pattern` is the layer index."""
  def apply(state: State) -> State:
    layers: dict[str, dict[int, str]] = {}
    for key, match in matches(state.params, pattern, allow_empty):
      try:
        index = int(match.group(1))
      except (IndexError, ValueError):
        raise SurgeryError(f'pattern {pattern!r} must capture the layer index of {key!r} '
                           'as its first group') from None
      target = expand(match, replacement)
      if index in layers.setdefault(target, {}):
        raise SurgeryError(f'{layers[target][index]!r} and {key!r} both give layer {index} '
                           f'of {target!r}')
      layers[target][index] = key
    groups = {}
    for target, by_index in layers.items():
      indices = sorted(by_index)
      missing = sorted(set(range(indices[0], indices[-1] + 1)) - set(indices))
      if missing:
        raise SurgeryError(f'stack into {target!r}: layer index {missing[0]} is missing '
                           f'(found {indices})')
      groups[target] = [by_index[i] for i in indices]
      _check_same(state, groups[target], target)
    _check_count({target: len(keys) for target, keys in groups.items()}, count, 'stack', axis)
    consumed = {k for keys in groups.values() for k in keys}
    _check_free(state, groups, consumed, 'stack')
    check_mirror_shapes(state, consumed, 'stack')

    def combine(leaves):
      ndim = leaves[0].value.ndim
      ax = normalize_axis(axis, ndim + 1, 'the stacked parameter')
      entries = _spec_entries(leaves[0], ndim)
      spec = None if entries is None else PartitionSpec(*entries[:ax], None, *entries[ax:])
      return Leaf(jnp.stack([leaf.value for leaf in leaves], axis=ax), spec)
    return structural(state, lambda tree, _: _merge(tree, groups, combine))
  return apply


def _spread(state: State, pieces: dict[str, list[str]], cut, op: str) -> State:
  """Replaces each key of `pieces` by the leaves `cut(key, leaf)` under the names it lists."""
  names = [name for names in pieces.values() for name in names]
  repeated = sorted({name for name in names if names.count(name) > 1})
  if repeated:
    raise SurgeryError(f'{op} gives the name {repeated[0]!r} to several pieces')
  _check_free(state, names, pieces, op)
  check_mirror_shapes(state, pieces, op)

  def edit(tree: Tree, _) -> Tree:
    out = {}
    for key, leaf in tree.items():
      if key in pieces:
        out.update(zip(pieces[key], cut(key, leaf)))
      else:
        out[key] = leaf
    return out
  return structural(state, edit)


@whole_tree
def unstack(pattern: str, replacement: str, axis: int = 0, count: int | None = None,
            allow_empty: bool = False) -> Op:
  """Splits axis `axis` into one leaf per layer: `{i}` in `replacement` is its index."""
  if '{i}' not in replacement:
    raise SurgeryError(f'replacement {replacement!r} must hold {{i}}, the layer index')

  def apply(state: State) -> State:
    pieces = {}
    for key, match in matches(state.params, pattern, allow_empty):
      x = state.params[key].value
      ax = normalize_axis(axis, x.ndim, key)
      template = expand(match, replacement)
      pieces[key] = [template.replace('{i}', str(i)) for i in range(x.shape[ax])]
    _check_count({key: len(names) for key, names in pieces.items()}, count, 'unstack', axis)

    def cut(key, leaf):
      ax = normalize_axis(axis, leaf.value.ndim, key)
      entries = _spec_entries(leaf, leaf.value.ndim)
      spec = None if entries is None else PartitionSpec(*entries[:ax], *entries[ax + 1:])
      return [Leaf(x, spec) for x in jnp.unstack(leaf.value, axis=ax)]
    return _spread(state, pieces, cut, 'unstack')
  return apply


@whole_tree
def split(source: str, axis: int, sizes: Sequence[int], targets: Sequence[str],
          allow_empty: bool = False) -> Op:
  """Splits each leaf `source` matches along `axis` into `sizes`, named `targets` (QKV split)."""
  sizes = [int(s) for s in sizes]
  if len(sizes) != len(targets):
    raise SurgeryError(f'split has {len(sizes)} sizes but {len(targets)} targets')

  def apply(state: State) -> State:
    pieces = {}
    for key, match in matches(state.params, source, allow_empty):
      x = state.params[key].value
      ax = normalize_axis(axis, x.ndim, key)
      if sum(sizes) != x.shape[ax]:
        raise SurgeryError(f'split sizes {sizes} of {key!r} add up to {sum(sizes)}, '
                           f'not its axis {ax} size {x.shape[ax]}')
      pieces[key] = [expand(match, t) for t in targets]
    bounds = [sum(sizes[:i]) for i in range(1, len(sizes))]

    def cut(key, leaf):
      ax = normalize_axis(axis, leaf.value.ndim, key)
      return [Leaf(x, leaf.spec) for x in jnp.split(leaf.value, bounds, axis=ax)]
    return _spread(state, pieces, cut, 'split')
  return apply


@whole_tree
def concat(sources: Sequence[str], axis: int, target: str, allow_empty: bool = False) -> Op:
  """Joins the leaves `sources` match along `axis` into `target` (QKV fuse)."""
  def apply(state: State) -> State:
    groups: dict[str, list] = {}
    for i, source in enumerate(sources):
      for key, match in matches(state.params, source, allow_empty):
        group = groups.setdefault(expand(match, target), [None] * len(sources))
        if group[i] is not None:
          raise SurgeryError(f'sources[{i}] ({source!r}) matches both {group[i]!r} and {key!r} '
                             f'for {expand(match, target)!r}')
        group[i] = key
    for name, keys in groups.items():
      if None in keys:
        i = keys.index(None)
        raise SurgeryError(f'concat into {name!r}: sources[{i}] ({sources[i]!r}) has no match')
      x = state.params[keys[0]].value
      _check_same(state, keys, name, skip_axis=normalize_axis(axis, x.ndim, keys[0]))
    consumed = {k for keys in groups.values() for k in keys}
    _check_free(state, groups, consumed, 'concat')
    check_mirror_shapes(state, consumed, 'concat')

    def combine(leaves):
      ax = normalize_axis(axis, leaves[0].value.ndim, target)
      return Leaf(jnp.concatenate([leaf.value for leaf in leaves], axis=ax), leaves[0].spec)
    return structural(state, lambda tree, _: _merge(tree, groups, combine))
  return apply
