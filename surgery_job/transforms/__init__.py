"""The ops a config's `transforms` list may name, and their construction from config dicts."""

import inspect
from typing import Any, Mapping, Sequence

from surgery_job.errors import SurgeryError
from surgery_job.transforms import layers, optimizer, shape, structure, values
from surgery_job.transforms.core import Leaf, Op, State

OPS = {
    'rename': structure.rename,
    'drop': structure.drop,
    'keep': structure.keep,
    'copy': structure.copy,
    'add': structure.add,
    'cast': values.cast,
    'reshape': shape.reshape,
    'transpose': shape.transpose,
    'scale': values.scale,
    'pad': shape.pad,
    'slice': shape.slice_,
    'stack': layers.stack,
    'unstack': layers.unstack,
    'split': layers.split,
    'concat': layers.concat,
    'map': values.map,
    'reset_optimizer': optimizer.reset_optimizer,
    'drop_optimizer': optimizer.drop_optimizer,
    'set_step': optimizer.set_step,
}


def build(transforms: Sequence[Mapping[str, Any]]) -> list[tuple[str, Op]]:
  """(label, op) for each config dict; a bad op, field or value fails naming the op's index."""
  ops = []
  for index, fields in enumerate(transforms):
    fields = dict(fields)
    name = fields.pop('op', None)
    label = f'op {index} ({name})'
    if name is None:
      raise SurgeryError(f"op {index}: missing field 'op'")
    if name not in OPS:
      raise SurgeryError(f'{label}: unknown op (known: {", ".join(OPS)})')
    parameters = inspect.signature(OPS[name]).parameters
    for field in fields:
      if field not in parameters:
        raise SurgeryError(f'{label}: unknown field {field!r} (fields: {", ".join(parameters)})')
    for parameter in parameters.values():
      if parameter.default is parameter.empty and parameter.name not in fields:
        raise SurgeryError(f'{label}: missing field {parameter.name!r}')
    try:
      ops.append((label, OPS[name](**fields)))
    except SurgeryError as e:
      raise e.within(label) from None
  return ops


def apply(ops: Sequence[tuple[str, Op]], state: State, touched: list | None = None) -> State:
  """Runs the ops in order; with `touched`, records (label, state before, state after) of each."""
  for label, op in ops:
    try:
      after = op(state)
    except SurgeryError as e:
      raise e.within(label) from None
    except (TypeError, ValueError) as e:
      raise SurgeryError(f'{label}: {str(e).splitlines()[0] if str(e) else type(e).__name__}') from None
    if touched is not None:
      touched.append((label, state, after))
    state = after
  return state


__all__ = ['OPS', 'Leaf', 'Op', 'State', 'apply', 'build']
