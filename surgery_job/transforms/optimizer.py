"""Ops on the optimizer state and counters: reset_optimizer, drop_optimizer, set_step."""

import jax.numpy as jnp
from jax.sharding import PartitionSpec

from surgery_job.errors import SurgeryError
from surgery_job.transforms.core import Leaf, Op, State, matches, whole_tree

STEP_KEY = 'step'


@whole_tree
def reset_optimizer(pattern: str, allow_empty: bool = False) -> Op:
  """Zeroes the moments of the params `pattern` matches."""
  def apply(state: State) -> State:
    if not state.mirrors:
      raise SurgeryError('the checkpoint has no optimizer state that mirrors the params')
    keys = {key for key, _ in matches(state.params, pattern, allow_empty)}
    return state.replace(mirrors={
        root: {k: Leaf(jnp.zeros_like(leaf.value), leaf.spec) if k in keys else leaf
               for k, leaf in tree.items()}
        for root, tree in state.mirrors.items()})
  return apply


def drop_optimizer() -> Op:
  """Keeps the params and `step` only: a serving export."""
  def apply(state: State) -> State:
    return state.replace(mirrors={}, others={k: v for k, v in state.others.items() if k == STEP_KEY})
  return apply


def set_step(value: int) -> Op:
  """Sets the `step` leaf (outside params_root) to `value`."""
  def apply(state: State) -> State:
    old = state.others.get(STEP_KEY)
    if old is None and STEP_KEY in state.params:
      raise SurgeryError(f'{STEP_KEY!r} lies under params_root; use add or map on it instead')
    dtype = old.value.dtype if old is not None else jnp.int32
    shape = old.value.shape if old is not None else ()
    if jnp.issubdtype(dtype, jnp.integer) and not jnp.iinfo(dtype).min <= value <= jnp.iinfo(dtype).max:
      # JAX would wrap it around without a word.
      raise SurgeryError(f'value {value} does not fit the {jnp.dtype(dtype).name} {STEP_KEY!r}')
    step = Leaf(jnp.full(shape, value, dtype), old.spec if old is not None else PartitionSpec())
    return state.replace(others={**state.others, STEP_KEY: step})
  return apply
