"""The checkpoint tree as '/'-joined keys, and where its params and their optimizer mirrors live.

Keys follow the Flax model-surgery guide: `params/Conv_0/kernel`, `opt_state/0/mu/Conv_0/kernel`, `step`.
A mirror is any outermost subtree outside the params whose keys are params' keys (optax `mu`, `nu`,
`trace`, ...; an NNX optimizer's moments cover the `nnx.Param`s only, not rng state or batch
stats), or one whose keys are params' keys each followed by a slot (`flax.optim`:
`state/param_states/Conv_0/bias/grad_ema`): each slot is a mirror, named with `*` standing for the
parameter (`state/param_states/*/grad_ema`). Structural ops apply to mirrors as they apply to params.

A key part may itself hold '/' (Haiku's `mlp/~/linear_0`, which Orbax keeps as one part): such a
key nests back as the input tree has it. Two leaves whose keys join alike, or an empty part, are
refused: one would silently take the other's place.
"""

import dataclasses
import re
from typing import Any, Mapping

import jax

from surgery_job.errors import SurgeryError

SEP = '/'
PARAM = '*'  # Stands for the parameter's path in the name of a mirror whose slot follows it.
# Params roots other than `params`: flax.optim's Optimizer, saved alone or as a field.
FLAX_OPTIM_ROOTS = ('target', 'optimizer/target')
_EMPTY_PART = re.compile(f'^{SEP}|{SEP}{SEP}|{SEP}$')  # Or a part that holds '//': looked at closer.


def flatten(tree: Any) -> dict[str, Any]:
  """Flat `{key: leaf}` of a nested tree; `None` subtrees (optax `EmptyState`) have no keys."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  flat = {jax.tree_util.keystr(path, simple=True, separator=SEP): leaf for path, leaf in leaves}
  if len(flat) < len(leaves) or '' in flat or any(map(_EMPTY_PART.search, flat)):
    _check_names(leaves)
  return flat


def _check_names(leaves: list) -> None:
  """Refuses an empty key part, and two leaves whose keys join alike: one would take the other's
  place without a word."""
  paths = {}
  for path, _ in leaves:
    if any(isinstance(part, jax.tree_util.DictKey) and str(part.key) == '' for part in path):
      raise SurgeryError(f'key {jax.tree_util.keystr(path)} has an empty part; the job names '
                         f"leaves by their '{SEP}'-joined path and cannot write it back")
    key = jax.tree_util.keystr(path, simple=True, separator=SEP)
    if key in paths:
      raise SurgeryError(f'keys {jax.tree_util.keystr(paths[key])} and {jax.tree_util.keystr(path)} '
                         f"both read as {key!r}: the job names leaves by their '{SEP}'-joined path "
                         'and would keep only one; rename one')
    paths[key] = path


def unflatten(flat: Mapping[str, Any], skeleton: Any) -> Any:
  """Nests `flat` as `skeleton` nests: a key splits where `skeleton`'s own keys end (a part may
  hold '/'), elsewhere at each '/'. Nodes that were lists (and their `None` items) get their old
  shape; `skeleton`'s subtrees without leaves (`None`, `{}`) are kept as they are."""
  split = _guided_split(skeleton)
  nested = {}
  for key, leaf in flat.items():
    *parents, name = split(key)
    node = nested
    for part in parents:
      node = node.setdefault(part, {})
    node[name] = leaf
  return _restore_sequences(nested, skeleton)


def _guided_split(skeleton: Any):
  """A function splitting a key into the parts of its path in `skeleton`, a node's longest
  matching key first."""
  seen = {}  # id(node) -> ({part: child}, its parts that hold '/', longest first)

  def split(key: str) -> list[str]:
    parts, node = [], skeleton
    while True:
      found = seen.get(id(node))
      if found is None:
        found = seen[id(node)] = _children(node)
      children, slashed = found
      head, _, rest = key.partition(SEP)
      if slashed:
        head = next((n for n in slashed if key == n or key.startswith(n + SEP)), head)
        rest = key[len(head) + 1:]
      parts.append(head)
      if len(head) == len(key):
        return parts
      node, key = children.get(head), rest
  return split


def _children(node: Any) -> tuple[dict[str, Any], list[str]]:
  """({key part: child} of a dict or sequence node, {} of anything else; its parts that hold '/',
  longest first)."""
  if isinstance(node, dict):
    children = node
  elif isinstance(node, (list, tuple)):
    children = {str(i): v for i, v in enumerate(node)}
  else:
    children = {}
  slashed = [n for n in children if isinstance(n, str) and SEP in n]
  return children, sorted(slashed, key=len, reverse=True) if slashed else slashed


def _restore_sequences(node: Any, skeleton: Any) -> Any:
  if not isinstance(node, dict):
    return node
  if isinstance(skeleton, (list, tuple)):
    return [_restore_sequences(node[str(i)], s) if str(i) in node else s if _leafless(s) else None
            for i, s in enumerate(skeleton)]
  children = skeleton if isinstance(skeleton, dict) else {}
  kept = {k: v for k, v in children.items() if k not in node and _leafless(v)}
  return {**{k: _restore_sequences(v, children.get(k)) for k, v in node.items()}, **kept}


def _leafless(skeleton: Any) -> bool:
  """Whether `skeleton` holds no leaf; stops at the first one it finds."""
  if isinstance(skeleton, dict):
    return all(map(_leafless, skeleton.values()))
  if isinstance(skeleton, (list, tuple)):
    return all(map(_leafless, skeleton))
  return skeleton is None


def with_sequences(skeleton: Any, sequences, keys) -> Any:
  """`skeleton` with the node at each (key, length) of `sequences` a list of `length` items, as
  Orbax saves a tuple (an optax state: `[ScaleByAdamState, EmptyState]` is `[{...}, None]`), for
  `unflatten` to nest `keys` into; items without leaves stay None."""
  for node, length in sequences:
    items = {rel.split(SEP, 1)[0] for key in keys if (rel := relative(key, node))}
    if not items:
      raise ValueError(f'output.sequences names {node!r}, which holds no output leaf')
    outside = sorted(items - {str(i) for i in range(length)})
    if outside:
      raise ValueError(f'output.sequences makes {node!r} a sequence of {length} items, but it '
                       f'holds {join(node, outside[0])!r}')
    skeleton = _set_sequence(skeleton, node.split(SEP), length)
  return skeleton


def _set_sequence(node: Any, parts: list[str], length: int) -> Any:
  if not parts:
    old = list(node) if isinstance(node, (list, tuple)) else []
    return [old[i] if i < len(old) else None for i in range(length)]
  head, rest = parts[0], parts[1:]
  if isinstance(node, (list, tuple)):
    return [_set_sequence(item, rest, length) if str(i) == head else item
            for i, item in enumerate(node)]
  children = dict(node) if isinstance(node, dict) else {}
  children[head] = _set_sequence(children.get(head), rest, length)
  return children


def join(*parts: str) -> str:
  return SEP.join(p for p in parts if p)


def relative(key: str, root: str) -> str | None:
  """`key` relative to `root`, or None when it is not under it."""
  if not root:
    return key
  return key[len(root) + 1:] if key.startswith(root + SEP) else None


def mirror_key(mirror: str, rel: str) -> str:
  """The full key of parameter `rel`'s leaf in `mirror` (a root, or a name holding `*`)."""
  parts = mirror.split(SEP)
  if PARAM not in parts:
    return join(mirror, rel)
  return join(*(rel if part == PARAM else part for part in parts))


def mirror_relative(key: str, mirror: str) -> str | None:
  """The parameter path of `key` in `mirror`, or None when `key` is not one of its leaves."""
  root, star, slot = mirror.partition(SEP + PARAM + SEP)
  if not star:
    return relative(key, mirror)
  rel = relative(key, root)
  if rel is None or not rel.endswith(SEP + slot):
    return None
  return rel[:-len(slot) - 1]


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where the params sit in the flat tree, and which subtrees mirror them."""
  params_root: str
  mirror_roots: tuple[str, ...]

  def names(self, key: str) -> list[str]:
    """`key`'s path under params_root and its parameter's path in each mirror it belongs to."""
    names = [relative(key, self.params_root),
             *(mirror_relative(key, root) for root in self.mirror_roots)]
    return [name for name in names if name]

  def split(self, flat: Mapping[str, Any]):
    """Splits into (params, {mirror_root: mirror}, others), params and mirrors keyed relatively."""
    params, others = {}, {}
    mirrors = {root: {} for root in self.mirror_roots}
    for key, leaf in flat.items():
      rel = relative(key, self.params_root)
      if rel is not None:
        params[rel] = leaf
        continue
      root = next((r for r in self.mirror_roots if mirror_relative(key, r) is not None), None)
      if root is None:
        others[key] = leaf
      else:
        mirrors[root][mirror_relative(key, root)] = leaf
    return params, mirrors, others


def find_layout(keys: list[str], params_root: str | None) -> Layout:
  """Finds the params root (default `params`, else flax.optim's `target` or `optimizer/target` beside
  its `state`, else the whole tree) and the subtrees mirroring it."""
  if params_root is None:
    params_root = _default_root(keys)
  param_keys = {rel for k in keys if (rel := relative(k, params_root)) is not None}
  if not param_keys:
    raise ValueError(f'params_root {params_root!r} holds no leaves')
  if not params_root:
    return Layout('', ())
  under = {}
  for key in keys:
    if relative(key, params_root) is not None:
      continue
    parts = key.split(SEP)
    for depth in range(1, len(parts)):
      under.setdefault(SEP.join(parts[:depth]), set()).add(SEP.join(parts[depth:]))
  slots = {root: _slots(rels, param_keys) for root, rels in under.items()}
  candidates = {root for root, rels in under.items() if rels <= param_keys or slots[root]}
  outermost = sorted(root for root in candidates if not any(
      relative(root, other) for other in candidates if other != root))
  mirror_roots = tuple(name for root in outermost for name in (
      [root] if under[root] <= param_keys else [join(root, PARAM, slot) for slot in slots[root]]))
  return Layout(params_root, mirror_roots)


def _default_root(keys: list[str]) -> str:
  def holds(root):
    return any(relative(k, root) is not None for k in keys)
  if holds('params'):
    return 'params'
  for root in FLAX_OPTIM_ROOTS:
    if holds(root) and holds(join(root.rpartition(SEP)[0], 'state')):
      return root
  return ''


def _slots(rels: set[str], param_keys: set[str]) -> list[str]:
  """The slots when every key of `rels` is a parameter's key followed by one part, else []."""
  slots = set()
  for rel in rels:
    param, _, slot = rel.rpartition(SEP)
    if param not in param_keys:
      return []
    slots.add(slot)
  return sorted(slots)
