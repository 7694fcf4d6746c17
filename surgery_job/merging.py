"""The merge stage: the leaves of several inputs (keyed `name:key`) made into the one tree that the
other ops then edit. Merge ops (`transforms/merge.py`) make the leaves their patterns match; every
other leaf comes from the primary input; the optimizer state comes from `optimizer_from`, or is
dropped.
"""

from typing import Any, Sequence

import jax.numpy as jnp

from surgery_job import inputs as inputs_lib, tree as tree_lib
from surgery_job.errors import SurgeryError
from surgery_job.transforms.core import FULL, Leaf, matches
from surgery_job.transforms.merge import Merge


def split_ops(ops: Sequence[tuple[str, Any]]) -> tuple[list[tuple[str, Merge]], list[tuple[str, Any]]]:
  """(merge ops, the other ops): the merge ops come first, as they make the tree the others edit."""
  merges = [(label, op) for label, op in ops if isinstance(op, Merge)]
  rest = ops[len(merges):]
  late = next((label for label, op in rest if isinstance(op, Merge)), None)
  if late:
    raise SurgeryError(f'{late}: merge ops come before every other op (they make the tree the '
                       'others edit)')
  return merges, list(rest)


class Stage:
  """Called with the plan's leaves ({plan key: Leaf}), returns the merged tree ({key: Leaf});
  `touched` then holds (label, keys) of what each merge made."""

  def __init__(self, merges: list[tuple[str, Merge]], names: list[str], primary: str,
               layout: tree_lib.Layout, optimizer_from: str | None):
    self.merges, self.names, self.primary, self.layout = merges, names, primary, layout
    self.optimizer_from = optimizer_from
    self.touched: list[tuple[str, list[str]]] = []
    if optimizer_from is not None and optimizer_from not in names:
      raise SurgeryError(f'config: optimizer_from names input {optimizer_from!r}, not one of '
                         f'{", ".join(names)}')
    self.roles = [self._roles(label, merge) for label, merge in merges]

  def _roles(self, label: str, merge: Merge) -> tuple[str | None, list[str]]:
    """(base, sources) of `merge`, every name checked."""
    for name in [merge.base, *(merge.sources or ())]:
      if name is not None and name not in self.names:
        raise SurgeryError(f'{label}: unknown input {name!r} (inputs: {", ".join(self.names)})')
    sources = list(merge.sources) if merge.sources is not None else [
        n for n in self.names if n != merge.base]
    twice = next((n for n in sources if sources.count(n) > 1 or n == merge.base), None)
    if twice:
      raise SurgeryError(f'{label}: input {twice!r} is named twice')
    if not sources:
      raise SurgeryError(f'{label}: no source to combine')
    if merge.weights is not None and len(merge.weights) != len(sources):
      raise SurgeryError(f'{label}: {len(merge.weights)} weights for {len(sources)} sources '
                         f'({", ".join(sources)})')
    return merge.base, sources

  def __call__(self, leaves: dict[str, Leaf]) -> dict[str, Leaf]:
    per_input = {name: {} for name in self.names}
    for plan_key, leaf in leaves.items():
      name, key = inputs_lib.split(plan_key)
      per_input[name][key] = leaf
    merged = dict(per_input[self.primary])
    optimizer = self._optimizer_keys(merged)
    self.touched = []
    for (label, merge), roles in zip(self.merges, self.roles):
      try:
        made = self._merge(merge, roles, per_input, merged, optimizer)
      except SurgeryError as e:
        raise e.within(label) from None
      self.touched.append((label, made))
    return self._with_optimizer(merged, per_input, optimizer)

  def _merge(self, merge: Merge, roles: tuple[str | None, list[str]], per_input, merged,
             optimizer: set[str]) -> list[str]:
    """Puts in `merged` each leaf `merge` makes; returns their keys."""
    base, sources = roles
    names = ([base] if base else []) + sources
    candidates = {}
    for name in names:
      for key in per_input[name]:
        if key not in optimizer and (view := self._view(key, merge.pattern)) is not None:
          candidates[view] = key
    made = []
    for view, _ in matches(candidates, merge.pattern):
      key = candidates[view]
      values = _agreeing(key, {name: per_input[name].get(key) for name in names})
      dtype = values[names[0]].dtype
      wide = jnp.float64 if dtype == jnp.float64 else jnp.float32
      value = merge.combine(view, values[base].astype(wide) if base else None,
                            [values[n].astype(wide) for n in sources])
      spec = (per_input[self.primary].get(key) or per_input[names[0]][key]).spec
      merged[key] = Leaf(value.astype(dtype), spec)
      made.append(key)
    return sorted(made)

  def _view(self, key: str, pattern: str) -> str | None:
    """The name `pattern` is matched against: the key under params_root, or `/` + the full key."""
    if pattern.startswith(FULL):
      return FULL + key
    return tree_lib.relative(key, self.layout.params_root)

  def _optimizer_keys(self, flat: dict[str, Leaf]) -> set[str]:
    """The optimizer's leaves: its mirrors of the params and what sits beside them (optax `count`)."""
    roots = {root.split(tree_lib.SEP)[0] for root in self.layout.mirror_roots}
    return {key for key in flat if key.split(tree_lib.SEP)[0] in roots}

  def _with_optimizer(self, merged, per_input, optimizer: set[str]) -> dict[str, Leaf]:
    if self.optimizer_from is None:
      if optimizer:
        self.touched.append(('optimizer state dropped (optimizer_from is not set)', sorted(optimizer)))
      return {k: v for k, v in merged.items() if k not in optimizer}
    chosen = per_input[self.optimizer_from]
    for key in sorted(optimizer):
      try:
        _agreeing(key, {self.primary: merged[key], self.optimizer_from: chosen.get(key)},
                  numeric=False)
      except SurgeryError as e:
        raise e.within('config: optimizer_from') from None
      merged[key] = chosen[key]
    self.touched.append((f'optimizer state from input {self.optimizer_from}', sorted(optimizer)))
    return merged


def _agreeing(key: str, leaves: dict[str, Leaf | None], numeric: bool = True) -> dict[str, Any]:
  """{input: value} of `key` in each input, which must all hold it with one shape and dtype (with
  `numeric`, a floating-point one)."""
  first = next(name for name, leaf in leaves.items() if leaf is not None)
  shape, dtype = leaves[first].value.shape, leaves[first].value.dtype
  for name, leaf in leaves.items():
    if leaf is None:
      raise SurgeryError(f'key {key!r} is in input {first} but not in input {name}')
    if leaf.value.shape != shape or leaf.value.dtype != dtype:
      raise SurgeryError(f'key {key!r} is {dtype.name}{list(shape)} in input {first} but '
                         f'{leaf.value.dtype.name}{list(leaf.value.shape)} in input {name}')
  if numeric and not jnp.issubdtype(dtype, jnp.floating):
    raise SurgeryError(f'key {key!r} is {dtype.name}, not a floating-point leaf: leave it '
                       'out of the pattern')
  return {name: leaf.value for name, leaf in leaves.items()}
