"""What every op works on: the params, their optimizer mirrors and the other leaves, each with a spec."""

import dataclasses
import re
import zlib
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from surgery_job.errors import SurgeryError


@dataclasses.dataclass(frozen=True)
class Leaf:
  value: Any  # A jax.Array, or a tracer while the job plans or jits.
  spec: PartitionSpec | None  # None: cannot be carried over; partition_rules decide.


@dataclasses.dataclass(frozen=True)
class State:
  params: dict[str, Leaf]  # Keyed relative to params_root.
  mirrors: dict[str, dict[str, Leaf]]  # Mirror root -> leaves keyed like the params.
  others: dict[str, Leaf]  # Full keys: `step`, optax `count`, ...

  def replace(self, **changes) -> 'State':
    return dataclasses.replace(self, **changes)


Tree = dict[str, Leaf]
Op = Callable[[State], State]


def matches(tree: Mapping[str, Leaf], pattern: str, allow_empty: bool = False) -> list[tuple[str, re.Match]]:
  """(key, match) of every key that `pattern` fully matches, in tree order."""
  try:
    regex = re.compile(pattern)
  except re.error as e:
    raise SurgeryError(f'bad pattern {pattern!r}: {e}') from None
  found = [(key, m) for key in tree if (m := regex.fullmatch(key))]
  if not found and not allow_empty:
    raise SurgeryError(f'pattern {pattern!r} matches no parameter')
  return found


def expand(match: re.Match, template: str) -> str:
  try:
    return match.expand(template)
  except (re.error, IndexError) as e:
    raise SurgeryError(f'replacement {template!r} for {match.string!r}: {e}') from None


def structural(state: State, edit: Callable[[Tree, bool], Tree]) -> State:
  """Applies `edit(tree, is_mirror)` to the params and to every optimizer mirror."""
  return state.replace(params=edit(state.params, False),
                       mirrors={root: edit(tree, True) for root, tree in state.mirrors.items()})


def check_mirror_shapes(state: State, keys, op: str) -> None:
  """A shape-changing op cannot follow a mirror leaf shaped unlike its parameter (factored moments)."""
  for root, tree in state.mirrors.items():
    for key in keys:
      param_shape, mirror_shape = state.params[key].value.shape, tree[key].value.shape
      if mirror_shape != param_shape:
        raise SurgeryError(
            f'{op} of {key!r}: optimizer state {root}/{key} has shape {mirror_shape}, unlike the '
            f'parameter {param_shape}; add reset_optimizer or drop_optimizer before this op')


def rebuilt(tree: Tree, changes: Mapping[str, tuple[str, Leaf] | None]) -> Tree:
  """`tree` in its order with `changes[key]` = (new key, leaf) or None (dropped) applied."""
  out = {}
  for key, leaf in tree.items():
    change = changes.get(key, (key, leaf))
    if change is not None:
      out[change[0]] = change[1]
  return out


def parse_dtype(name: str) -> jnp.dtype:
  try:
    return jnp.dtype(name)
  except TypeError:
    raise SurgeryError(f'unknown dtype {name!r}') from None


INITS = ('zeros', 'ones', 'constant', 'normal', 'truncated_normal', 'mean')


def check_init(init: str, allowed: tuple[str, ...]) -> None:
  if init not in allowed:
    raise SurgeryError(f'unknown init {init!r} (one of: {", ".join(allowed)})')


def fill(init: str, shape, dtype, *, key: str, value: float = 0.0, stddev: float = 0.02,
         seed: int = 0) -> jax.Array:
  """New values for `key`: the same on any mesh (the PRNG is partitionable), distinct per key."""
  if init == 'zeros':
    return jnp.zeros(shape, dtype)
  if init == 'ones':
    return jnp.ones(shape, dtype)
  if init == 'constant':
    return jnp.full(shape, value, dtype)
  rng = jax.random.fold_in(jax.random.key(seed), zlib.crc32(key.encode()))
  if init == 'normal':
    return (stddev * jax.random.normal(rng, shape, jnp.float32)).astype(dtype)
  if init == 'truncated_normal':
    return (stddev * jax.random.truncated_normal(rng, -2.0, 2.0, shape, jnp.float32)).astype(dtype)
  raise SurgeryError(f'unknown init {init!r}')


def normalize_axis(axis: int, ndim: int, key: str) -> int:
  if not -ndim <= axis < ndim:
    raise SurgeryError(f'axis {axis} out of range for {key!r} with {ndim} dimensions')
  return axis % ndim
