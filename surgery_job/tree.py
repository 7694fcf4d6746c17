"""The checkpoint tree as '/'-joined keys, and where its params and their optimizer mirrors live.

Keys follow the Flax model-surgery guide: `params/Conv_0/kernel`, `opt_state/0/mu/Conv_0/kernel`, `step`.
A mirror is any outermost subtree outside the params whose keys are params' keys (optax `mu`, `nu`,
`trace`, ...; an NNX optimizer's moments cover the `nnx.Param`s only, not rng state or batch
stats): structural ops apply to mirrors as they apply to params.
"""

import dataclasses
from typing import Any, Mapping

import jax
from flax import traverse_util

SEP = '/'


def flatten(tree: Any) -> dict[str, Any]:
  """Flat `{key: leaf}` of a nested tree; `None` subtrees (optax `EmptyState`) have no keys."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(path, simple=True, separator=SEP): leaf for path, leaf in leaves}


def unflatten(flat: Mapping[str, Any], skeleton: Any) -> Any:
  """Nests `flat`, giving nodes that were lists (and their `None` items) in `skeleton` their old shape."""
  nested = traverse_util.unflatten_dict({tuple(k.split(SEP)): v for k, v in flat.items()})
  return _restore_sequences(nested, skeleton)


def _restore_sequences(node: Any, skeleton: Any) -> Any:
  if not isinstance(node, dict):
    return node
  if isinstance(skeleton, (list, tuple)):
    return [_restore_sequences(node[str(i)], s) if str(i) in node else None
            for i, s in enumerate(skeleton)]
  children = skeleton if isinstance(skeleton, dict) else {}
  return {k: _restore_sequences(v, children.get(k)) for k, v in node.items()}


def join(*parts: str) -> str:
  return SEP.join(p for p in parts if p)


def relative(key: str, root: str) -> str | None:
  """`key` relative to `root`, or None when it is not under it."""
  if not root:
    return key
  return key[len(root) + 1:] if key.startswith(root + SEP) else None


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where the params sit in the flat tree, and which subtrees mirror them."""
  params_root: str
  mirror_roots: tuple[str, ...]

  def split(self, flat: Mapping[str, Any]):
    """Splits into (params, {mirror_root: mirror}, others), params and mirrors keyed relatively."""
    params, others = {}, {}
    mirrors = {root: {} for root in self.mirror_roots}
    for key, leaf in flat.items():
      rel = relative(key, self.params_root)
      if rel is not None:
        params[rel] = leaf
        continue
      root = next((r for r in self.mirror_roots if relative(key, r) is not None), None)
      if root is None:
        others[key] = leaf
      else:
        mirrors[root][relative(key, root)] = leaf
    return params, mirrors, others


def find_layout(keys: list[str], params_root: str | None) -> Layout:
  """Finds the params root (default `params`, else the whole tree) and the subtrees mirroring it."""
  if params_root is None:
    params_root = 'params' if any(relative(k, 'params') is not None for k in keys) else ''
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
  candidates = {root for root, rels in under.items() if rels <= param_keys}
  mirror_roots = tuple(sorted(root for root in candidates if not any(
      relative(root, other) for other in candidates if other != root)))
  return Layout(params_root, mirror_roots)
