"""Ops that change which parameters exist: rename, drop, keep, copy, add. Moments follow."""

from typing import Sequence

from surgery_job.errors import SurgeryError
from surgery_job.transforms.core import (
  INITS,
  Leaf,
  Op,
  State,
  check_init,
  expand,
  fill,
  matches,
  parse_dtype,
  rebuilt,
  structural,
  whole_tree,
)


def _targets(state: State, pattern: str, template: str, allow_empty: bool) -> dict[str, str]:
  """{matched key: expanded template}, refusing two keys that land on one name."""
  targets, owner = {}, {}
  for key, match in matches(state.params, pattern, allow_empty):
    new = expand(match, template)
    if new in owner:
      raise SurgeryError(f'{owner[new]!r} and {key!r} would both become {new!r}')
    owner[new], targets[key] = key, new
  return targets


@whole_tree
def rename(pattern: str, replacement: str, allow_empty: bool = False) -> Op:
  """Renames each key `pattern` matches to `replacement` expanded (`\\1`); its moments follow."""
  def apply(state: State) -> State:
    targets = _targets(state, pattern, replacement, allow_empty)
    for key, new in targets.items():
      if new in state.params and new not in targets:
        raise SurgeryError(f'renaming {key!r} to {new!r} collides with an existing parameter')
    return structural(state, lambda tree, _: rebuilt(
        tree, {key: (new, tree[key]) for key, new in targets.items() if key in tree}))
  return apply


@whole_tree
def drop(pattern: str, allow_empty: bool = False) -> Op:
  """Drops the leaves `pattern` matches, and their moments."""
  def apply(state: State) -> State:
    dropped = {key: None for key, _ in matches(state.params, pattern, allow_empty)}
    return structural(state, lambda tree, _: rebuilt(tree, dropped))
  return apply


@whole_tree
def keep(pattern: str, allow_empty: bool = False) -> Op:
  """Keeps only the leaves `pattern` matches (and their moments); drops the rest."""
  def apply(state: State) -> State:
    kept = {key for key, _ in matches(state.params, pattern, allow_empty)}
    dropped = {key: None for key in state.params if key not in kept}
    return structural(state, lambda tree, _: rebuilt(tree, dropped))
  return apply


@whole_tree
def copy(source: str, target: str, allow_empty: bool = False) -> Op:
  """Copies each leaf `source` matches to `target` expanded; the moments of a parameter too."""
  def apply(state: State) -> State:
    targets = _targets(state, source, target, allow_empty)
    for key, new in targets.items():
      if new in state.params:
        raise SurgeryError(f'copying {key!r} to {new!r} collides with an existing parameter')
    # A copy outside the params (a full-key target) is a plain leaf: no optimizer state follows it.
    return structural(state, lambda tree, is_mirror: {**tree, **{
        new: tree[key] for key, new in targets.items()
        if key in tree and (not is_mirror or state.is_param(new))}})
  return apply


@whole_tree
def add(path: str, shape: Sequence[int], dtype: str = 'float32', init: str = 'zeros',
        value: float = 0.0, stddev: float = 0.02, seed: int = 0) -> Op:
  """A new leaf at `path` of `shape` and `dtype`, filled by `init` (zeros, ones, constant, normal)."""
  dtype = parse_dtype(dtype)
  check_init(init, INITS[:-1])
  shape = tuple(int(s) for s in shape)

  def apply(state: State) -> State:
    if path in state.params:
      raise SurgeryError(f'parameter {path!r} already exists')

    def edit(tree, is_mirror):
      if is_mirror and not state.is_param(path):
        return tree
      new = fill('zeros' if is_mirror else init, shape, dtype, key=path, value=value,
                 stddev=stddev, seed=seed)
      return {**tree, path: Leaf(new, None)}
    return structural(state, edit)
  return apply
