"""Ops that change values and keep the tree: cast, scale, map. They touch the params, not the moments.

A cast also leaves a record of each leaf it casts (source and result) while `recording_casts` is
on: the job measures what the cast lost from them, in the same jitted function.
"""

import contextlib
import contextvars
import dataclasses
import importlib
from typing import Any, Iterator

import jax.numpy as jnp

from surgery_job import tree as tree_lib
from surgery_job.errors import SurgeryError
from surgery_job.transforms.core import (
  FULL,
  Leaf,
  Op,
  State,
  check_numeric,
  matches,
  parse_dtype,
  whole_tree,
)


@dataclasses.dataclass(frozen=True)
class CastRecord:
  key: str  # The full key of the leaf when it was cast.
  dtype: str
  allow_overflow: bool
  source: Any  # Values before and after the cast (tracers while the job plans or jits).
  result: Any


_records: contextvars.ContextVar[list[CastRecord] | None] = contextvars.ContextVar(
    'cast_records', default=None)


@contextlib.contextmanager
def recording_casts() -> Iterator[list[CastRecord]]:
  """Collects a CastRecord of every leaf the casts run inside the block cast, in order."""
  token = _records.set([])
  try:
    yield _records.get()
  finally:
    _records.reset(token)


def _on_params(pattern: str, allow_empty: bool, change) -> Op:
  def apply(state: State) -> State:
    keys = {key for key, _ in matches(state.params, pattern, allow_empty)}
    return state.replace(params={k: change(k, leaf, state) if k in keys else leaf
                                 for k, leaf in state.params.items()})
  return apply


@whole_tree
def cast(pattern: str, dtype: str, optimizer: bool = False, allow_empty: bool = False,
         allow_overflow: bool = False) -> Op:
  """Casts the leaves `pattern` matches to `dtype`; their moments too with `optimizer=True`.

  `allow_overflow`: finite values that become inf or NaN are accepted (the job fails otherwise)."""
  dtype = parse_dtype(dtype)

  def apply(state: State) -> State:
    keys = dict.fromkeys(key for key, _ in matches(state.params, pattern, allow_empty))
    for key in keys:
      check_numeric(key, state.params[key], 'cast')

    def full_key(root, key):
      if state.full_keys:  # Keyed by the parameter's full key: its mirror's is under `root`.
        return key[len(FULL):] if root is None else tree_lib.mirror_key(
            root, tree_lib.relative(key[len(FULL):], state.params_root))
      if root is None:
        return tree_lib.join(state.params_root, key)
      return tree_lib.mirror_key(root, key)

    def edit(tree, root=None):
      out = {}
      for k, leaf in tree.items():
        # A leaf of the dtype already is left as it is: nothing is lost, nothing to measure.
        changed = k in keys and leaf.value.dtype != dtype
        out[k] = Leaf(leaf.value.astype(dtype), leaf.spec) if changed else leaf
        if changed and _records.get() is not None:
          _records.get().append(CastRecord(full_key(root, k), dtype.name, allow_overflow,
                                           leaf.value, out[k].value))
      return out
    mirrors = ({root: edit(tree, root) for root, tree in state.mirrors.items()} if optimizer
               else state.mirrors)
    return state.replace(params=edit(state.params), mirrors=mirrors)
  return apply


@whole_tree
def scale(pattern: str, factor: float, allow_empty: bool = False) -> Op:
  """Multiplies the leaves `pattern` matches by `factor`."""
  def change(key, leaf, _):
    check_numeric(key, leaf, 'scale')
    return Leaf((leaf.value * factor).astype(leaf.value.dtype), leaf.spec)
  return _on_params(pattern, allow_empty, change)


@whole_tree
def map(pattern: str, fn: str, allow_empty: bool = False) -> Op:  # pylint: disable=redefined-builtin
  """Applies `fn` ('module:function', jittable, array to array) to the leaves `pattern` matches."""
  function = _import(fn)

  def change(key, leaf, state):
    value = function(leaf.value)
    if not hasattr(value, 'shape'):
      raise SurgeryError(f'{fn} returned {type(value).__name__} for {key!r}, not an array')
    if value.shape != leaf.value.shape and any(key in mirror for mirror in state.mirrors.values()):
      raise SurgeryError(f'{fn} changed the shape of {key!r} from {leaf.value.shape} to '
                         f'{value.shape}, which its optimizer state cannot follow; add '
                         'reset_optimizer or drop_optimizer, or use a structural op')
    return Leaf(jnp.asarray(value), leaf.spec if value.shape == leaf.value.shape else None)
  return _on_params(pattern, allow_empty, change)


def _import(path: str):
  module_name, _, attr = path.partition(':')
  if not module_name or not attr:
    raise SurgeryError(f"fn {path!r} must be 'module:function'")
  try:
    function = getattr(importlib.import_module(module_name), attr)
  except Exception as e:  # pylint: disable=broad-except
    # Importing runs the module's code, which may raise anything.
    raise SurgeryError(f'cannot import fn {path!r}: {type(e).__name__}: {e}') from None
  if not callable(function):
    raise SurgeryError(f'fn {path!r} is not callable')
  return function
