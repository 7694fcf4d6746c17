"""Ops that change values and keep the tree: cast, scale, map. They touch the params, not the moments."""

import importlib

import jax.numpy as jnp

from surgery_job.errors import SurgeryError
from surgery_job.transforms.core import Leaf, Op, State, check_numeric, matches, parse_dtype, whole_tree


def _on_params(pattern: str, allow_empty: bool, change) -> Op:
  def apply(state: State) -> State:
    keys = {key for key, _ in matches(state.params, pattern, allow_empty)}
    return state.replace(params={k: change(k, leaf, state) if k in keys else leaf
                                 for k, leaf in state.params.items()})
  return apply


@whole_tree
def cast(pattern: str, dtype: str, optimizer: bool = False, allow_empty: bool = False) -> Op:
  dtype = parse_dtype(dtype)

  def apply(state: State) -> State:
    keys = dict.fromkeys(key for key, _ in matches(state.params, pattern, allow_empty))
    for key in keys:
      check_numeric(key, state.params[key], 'cast')

    def edit(tree):
      return {k: Leaf(leaf.value.astype(dtype), leaf.spec) if k in keys else leaf
              for k, leaf in tree.items()}
    mirrors = {root: edit(tree) for root, tree in state.mirrors.items()} if optimizer else state.mirrors
    return state.replace(params=edit(state.params), mirrors=mirrors)
  return apply


@whole_tree
def scale(pattern: str, factor: float, allow_empty: bool = False) -> Op:
  def change(key, leaf, _):
    check_numeric(key, leaf, 'scale')
    return Leaf((leaf.value * factor).astype(leaf.value.dtype), leaf.spec)
  return _on_params(pattern, allow_empty, change)


@whole_tree
def map(pattern: str, fn: str, allow_empty: bool = False) -> Op:  # pylint: disable=redefined-builtin
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
