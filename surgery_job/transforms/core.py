"""What every op works on: the params, their optimizer mirrors and the other leaves, each with a spec.

An op's pattern is matched against the params' keys relative to params_root. A pattern (or source,
path) that starts with `/` is a full key instead: the op then runs on a view of the whole tree whose
params are every leaf but the optimizer mirrors, keyed `/` + full key. Mirrors still follow the
params: they are keyed by their parameter's full key in the view.
"""

import dataclasses
import functools
import inspect
import re
import zlib
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from surgery_job import keys, tree as tree_lib
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
  params_root: str = ''
  full_keys: bool = False  # True in the view a full-key op runs on (see the module docstring).
  # The Hugging Face config.json that goes with the tensors: the input folder's, or the one a model
  # family's op made for the output; None for neither.
  model_config: dict[str, Any] | None = None
  notes: tuple[str, ...] = ()  # What model family ops found (sizes, layouts), for the plan and report.

  def replace(self, **changes) -> 'State':
    return dataclasses.replace(self, **changes)

  def is_param(self, key: str) -> bool:
    """Whether `key` of `params` is a parameter, one its optimizer mirrors hold state for."""
    return not self.full_keys or tree_lib.relative(key[len(FULL):], self.params_root) is not None


Tree = dict[str, Leaf]
Op = Callable[[State], State]
FULL = '/'


def whole_tree(factory: Callable[..., Op]) -> Callable[..., Op]:
  """Makes an op factory accept full-key patterns: when its first field (pattern, source, sources
  or path) starts with `/`, the op runs on the whole-tree view, and its other key fields
  (replacement, target, targets) name full keys too."""
  @functools.wraps(factory)
  def build(*args, **kwargs) -> Op:
    op = factory(*args, **kwargs)
    first = next(iter(inspect.signature(factory).bind(*args, **kwargs).arguments.values()))
    names = [first] if isinstance(first, str) else list(first)
    if not any(name.startswith(FULL) for name in names):
      return op

    def apply(state: State) -> State:
      _refuse_mirror_leaves(state, names)
      return _from_view(op(_to_view(state)))
    return apply
  return build


def _refuse_mirror_leaves(state: State, patterns: list[str]) -> None:
  """Optimizer mirrors follow their parameters; a full-key pattern naming one would be ignored."""
  for root, mirror in state.mirrors.items():
    for key in mirror:
      full = FULL + tree_lib.mirror_key(root, key)
      for pattern in patterns:
        try:
          hit = re.fullmatch(pattern, full)
        except re.error:
          continue  # `matches` reports a bad pattern.
        if hit:
          raise SurgeryError(f'pattern {pattern!r} matches {full!r}, optimizer state that follows its '
                             'parameter: name the parameter, or use reset_optimizer or drop_optimizer')


def _to_view(state: State) -> State:
  def full(key):
    return FULL + tree_lib.join(state.params_root, key)
  params = {full(k): leaf for k, leaf in state.params.items()}
  params.update({FULL + k: leaf for k, leaf in state.others.items()})
  mirrors = {root: {full(k): leaf for k, leaf in mirror.items()} for root, mirror in state.mirrors.items()}
  return state.replace(params=params, mirrors=mirrors, others={}, full_keys=True)


def _from_view(view: State) -> State:
  """The state again: leaves under params_root are params, the others keep their full keys."""
  params, others, mirrors = {}, {}, {}
  for key, leaf in view.params.items():
    if not key.startswith(FULL):
      raise SurgeryError(f'{key!r} is not a full key: a full-key op names its results with a '
                         f'leading {FULL!r} too')
    rel = tree_lib.relative(key[len(FULL):], view.params_root)
    if rel is None:
      others[key[len(FULL):]] = leaf
    else:
      params[rel] = leaf
  for root, mirror in view.mirrors.items():
    mirrors[root] = {}
    for key, leaf in mirror.items():
      rel = tree_lib.relative(key.removeprefix(FULL), view.params_root) if key.startswith(FULL) else None
      if rel is None:
        raise SurgeryError(f'{key!r} would leave params_root {view.params_root!r}, but optimizer state '
                           f'({root}) follows it; add drop_optimizer first, or keep it under params_root')
      mirrors[root][rel] = leaf
  return view.replace(params=params, mirrors=mirrors, others=others, full_keys=False)


def full_shapes(state: State) -> dict[str, tuple[int, ...]]:
  """Every leaf's full key (params, their optimizer mirrors, the others) and shape."""
  shapes = {tree_lib.join(state.params_root, k): leaf.value.shape for k, leaf in state.params.items()}
  for root, mirror in state.mirrors.items():
    shapes.update({tree_lib.mirror_key(root, k): leaf.value.shape for k, leaf in mirror.items()})
  shapes.update({k: leaf.value.shape for k, leaf in state.others.items()})
  return shapes


class NoMatch(SurgeryError):
  """A pattern that matches nothing; `pattern` for `as_full_key`."""

  def __init__(self, pattern: str):
    super().__init__(f'pattern {pattern!r} matches no ' + (
        'key of the checkpoint' if pattern.startswith(FULL) else 'parameter'))
    self.pattern = pattern


def matches(tree: Mapping[str, Leaf], pattern: str, allow_empty: bool = False) -> list[tuple[str, re.Match]]:
  """(key, match) of every key that `pattern` fully matches, in tree order."""
  try:
    regex = re.compile(pattern)
  except re.error as e:
    raise SurgeryError(f'bad pattern {pattern!r}: {e}') from None
  found = [(key, m) for key in tree if (m := regex.fullmatch(key))]
  if not found and not allow_empty:
    raise NoMatch(pattern)
  return found


def as_full_key(state: State, pattern: str) -> str:
  """What a relative pattern that matched nothing matches as a full key: a key copied from
  `surgery-job-inspect`, which shows full keys, holds params_root too. '' when nothing."""
  if pattern.startswith(FULL) or state.full_keys or not state.params_root:
    return ''
  regex = re.compile(FULL + pattern)
  found = sum(1 for key in _to_view(state).params if regex.fullmatch(key))
  if not found:
    return ''
  return (f'; patterns are relative to params_root {state.params_root!r}; `{FULL}{pattern}` matches '
          f'{found} key{"s" if found > 1 else ""}')


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
    for key in (k for k in keys if k in tree):
      param_shape, mirror_shape = state.params[key].value.shape, tree[key].value.shape
      if mirror_shape != param_shape:
        raise SurgeryError(
            f'{op} of {key!r}: optimizer state {tree_lib.mirror_key(root, key)} has shape '
            f'{mirror_shape}, unlike the parameter {param_shape}; add reset_optimizer or '
            'drop_optimizer before this op')


def rebuilt(tree: Tree, changes: Mapping[str, tuple[str, Leaf] | None]) -> Tree:
  """`tree` in its order with `changes[key]` = (new key, leaf) or None (dropped) applied."""
  out = {}
  for key, leaf in tree.items():
    change = changes.get(key, (key, leaf))
    if change is not None:
      out[change[0]] = change[1]
  return out


def check_numeric(key: str, leaf: Leaf, op: str) -> None:
  """Ops that compute new values have nothing to compute on a typed PRNG key."""
  if keys.is_key(leaf.value.dtype):
    raise SurgeryError(f'{op} of {key!r}: it is a PRNG key ({leaf.value.dtype}), whose bits {op} '
                       'cannot change; leave it out of the pattern')


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
