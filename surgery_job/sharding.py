"""The job's mesh, and the PartitionSpec of every leaf on it: carried over, derived, or from rules."""

import collections
import math
import re
from typing import Any, Sequence

import jax
import numpy as np
from absl import logging
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from surgery_job.errors import SurgeryError


def saved_spec(array_metadata: Any) -> PartitionSpec:
  """The spec a leaf was saved with; a single-device leaf counts as replicated."""
  spec = getattr(array_metadata.sharding, 'partition_spec', None)
  return PartitionSpec(*spec) if spec is not None else PartitionSpec()


def saved_mesh_shape(metadata_leaves: Sequence[Any]) -> tuple[tuple[int, ...], tuple[str, ...]] | None:
  """The (shape, axes) of the mesh most leaves were saved on, if any leaf was sharded."""
  meshes = collections.Counter(
      (tuple(int(s) for s in m.sharding.shape), tuple(m.sharding.axis_names))
      for m in metadata_leaves if hasattr(m.sharding, 'axis_names'))
  return meshes.most_common(1)[0][0] if meshes else None


def make_mesh(shape: Sequence[int] | None, axes: Sequence[str] | None,
              saved: tuple[tuple[int, ...], tuple[str, ...]] | None,
              devices: Sequence[Any]) -> Mesh:
  """The job's mesh: the configured one, else the saved one when the devices allow it."""
  count = len(devices)
  if shape is None and axes is None:
    shape, axes = _default_mesh(saved, count)
  elif shape is None or axes is None:
    if saved is None or len(saved[0]) != len(shape or axes):
      raise SurgeryError('config: set both mesh.shape and mesh.axes, or neither')
    shape, axes = shape or saved[0], axes or saved[1]
  shape, axes = list(shape), tuple(axes)
  if len(shape) != len(axes):
    raise SurgeryError(f'config: mesh.shape {tuple(shape)} and mesh.axes {axes} differ in length')
  if shape.count(-1) > 1:
    raise SurgeryError(f'config: mesh.shape {tuple(shape)} has more than one -1')
  if -1 in shape:
    rest = math.prod(s for s in shape if s != -1)
    if rest <= 0 or count % rest:
      raise SurgeryError(f'config: mesh.shape {tuple(shape)} does not fit {count} devices')
    shape[shape.index(-1)] = count // rest
  if any(s <= 0 for s in shape) or math.prod(shape) != count:
    raise SurgeryError(f'config: mesh.shape {tuple(shape)} needs {math.prod(shape)} devices, '
                       f'found {count}')
  # Auto axes: the job passes explicit in/out shardings to jax.jit.
  return Mesh(np.asarray(devices).reshape(shape), axes, axis_types=(AxisType.Auto,) * len(axes))


def _default_mesh(saved, count: int) -> tuple[list[int], tuple[str, ...]]:
  if saved is None:
    return [count], ('data',)
  shape, axes = list(saved[0]), saved[1]
  if math.prod(shape) == count:
    return shape, axes
  if count % math.prod(shape[1:]) == 0:
    fitted = [-1] + shape[1:]
  else:
    fitted = [-1] + [1] * (len(shape) - 1)
  logging.info('The checkpoint was saved on a %s mesh; %d devices here: using %s.',
               dict(zip(axes, shape)), count, fitted)
  return fitted, axes


def _axis_names(entry: Any) -> tuple[str, ...]:
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh, key: str) -> PartitionSpec:
  """`spec` on `mesh`: axes the mesh lacks, or that do not divide the dimension, are dropped."""
  fitted = []
  for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = tuple(n for n in _axis_names(entry) if n in mesh.shape)
    if names and dim % math.prod(mesh.shape[n] for n in names):
      names = ()
    if names != _axis_names(entry):
      logging.info('%s: spec %s does not fit shape %s on mesh %s; dimension replicated.',
                   key, spec, tuple(shape), dict(mesh.shape))
    fitted.append(None if not names else names[0] if len(names) == 1 else names)
  return PartitionSpec(*fitted)


def rule_spec(rules: Sequence[tuple[str, Any]], key: str, names: Sequence[str], shape: Sequence[int],
              mesh: Mesh) -> PartitionSpec:
  """The spec of the first rule whose regex is found in `key` or any of its other `names`
  (its path under params_root or a mirror); replicated if none is."""
  for index, (pattern, spec) in enumerate(rules):
    if any(re.search(pattern, name) for name in (key, *names)):
      spec = PartitionSpec(*spec)
      _check_rule(index, pattern, spec, key, shape, mesh)
      return spec
  return PartitionSpec()


def _check_rule(index, pattern, spec, key, shape, mesh) -> None:
  where = f'partition_rules[{index}] ({pattern!r}) for {key!r}'
  if len(spec) > len(shape):
    raise SurgeryError(f'{where}: spec {spec} has more entries than shape {tuple(shape)}')
  for dim, entry in zip(shape, spec):
    names = _axis_names(entry)
    unknown = [n for n in names if n not in mesh.shape]
    if unknown:
      raise SurgeryError(f'{where}: mesh has no axis {unknown[0]!r} (axes: {tuple(mesh.shape)})')
    if dim % math.prod(mesh.shape[n] for n in names):
      raise SurgeryError(f'{where}: dimension {dim} of shape {tuple(shape)} does not divide '
                         f'over mesh axes {names}')


def abstract(shape, dtype, mesh: Mesh, spec: PartitionSpec) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=NamedSharding(mesh, spec))
