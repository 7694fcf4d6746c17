"""The ops a config's `transforms` list may name, and their construction from config dicts."""

import collections.abc
import difflib
import inspect
import numbers
import typing
from typing import Any, Callable, Mapping, Sequence

from absl import logging

from surgery_job.errors import SurgeryError
from surgery_job.transforms import (
  families,
  heads,
  layers,
  merge,
  optimizer,
  shape,
  structure,
  values,
)
from surgery_job.transforms.core import Leaf, NoMatch, Op, State, as_full_key

OPS: dict[str, Callable[..., Op | merge.Merge]] = {
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
    'split_heads': heads.split_heads,
    'merge_heads': heads.merge_heads,
    'rotary': heads.rotary,
    'llama_to_hf': families.llama_to_hf,
    'llama_from_hf': families.llama_from_hf,
    'map': values.map,
    'reset_optimizer': optimizer.reset_optimizer,
    'drop_optimizer': optimizer.drop_optimizer,
    'set_step': optimizer.set_step,
    **merge.OPS,
}


def _conforms(value: Any, annotation: Any) -> bool:
  """Whether `value` fits an op factory's annotation; annotations it does not know pass."""
  if typing.get_origin(annotation) is collections.abc.Sequence:
    item, = typing.get_args(annotation)
    return isinstance(value, (list, tuple)) and all(_conforms(v, item) for v in value)
  if annotation is bool:
    return isinstance(value, bool)
  if annotation is int:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
  if annotation is float:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
  if annotation is str:
    return isinstance(value, str)
  return True


def _describe(annotation: Any) -> str:
  if typing.get_origin(annotation) is collections.abc.Sequence:
    return f'a list of {_describe(typing.get_args(annotation)[0])}'
  return getattr(annotation, '__name__', str(annotation))


def _one_line(error: Exception) -> str:
  text = str(error).strip()
  return f'{type(error).__name__}: {text.splitlines()[0]}' if text else type(error).__name__


def build(transforms: Sequence[Mapping[str, Any]]) -> list[tuple[str, Op]]:
  """(label, op) for each config dict; a bad op, field or value fails naming the op's index."""
  ops = []
  for index, fields in enumerate(transforms):
    fields = dict(fields)
    name = fields.pop('op', None)
    label = f'op {index} ({name})'
    if name is None:
      raise SurgeryError(f"op {index}: missing field 'op'")
    if not isinstance(name, str) or name not in OPS:
      closest = difflib.get_close_matches(name, OPS, n=1) if isinstance(name, str) else []
      raise SurgeryError(f'{label}: unknown op' + (f'; did you mean {closest[0]!r}?' if closest else '')
                         + f' (known: {", ".join(OPS)})')
    parameters = inspect.signature(OPS[name]).parameters
    hints = typing.get_type_hints(OPS[name])
    for field, value in fields.items():
      if field not in parameters:
        raise SurgeryError(f'{label}: unknown field {field!r} (fields: {", ".join(parameters)})')
      if field in hints and not _conforms(value, hints[field]):
        raise SurgeryError(f'{label}: field {field!r} expects {_describe(hints[field])}, '
                           f'got {value!r}')
    for parameter in parameters.values():
      if parameter.default is parameter.empty and parameter.name not in fields:
        raise SurgeryError(f'{label}: missing field {parameter.name!r}')
    try:
      ops.append((label, OPS[name](**fields)))
    except SurgeryError as e:
      raise e.within(label) from None
    except Exception as e:  # pylint: disable=broad-except
      # A user's `map` module runs arbitrary code at import.
      logging.debug('%s failed', label, exc_info=True)
      raise SurgeryError(f'{label}: {_one_line(e)}') from None
  return ops


def apply(ops: Sequence[tuple[str, Op]], state: State, touched: list | None = None) -> State:
  """Runs the ops in order; with `touched`, records (label, state before, state after) of each.

  Any failure names the op: the ops run first while the plan is traced, where a bad value or a
  user's `map` function may raise anything. `--verbosity=1` logs the traceback.
  """
  for label, op in ops:
    try:
      after = op(state)
    except NoMatch as e:
      raise SurgeryError(f'{label}: {e}{as_full_key(state, e.pattern)}') from None
    except SurgeryError as e:
      raise e.within(label) from None
    except Exception as e:  # pylint: disable=broad-except
      logging.debug('%s failed', label, exc_info=True)
      raise SurgeryError(f'{label}: {_one_line(e)}') from None
    if touched is not None:
      touched.append((label, state, after))
    state = after
  return state


__all__ = ['OPS', 'Leaf', 'Op', 'State', 'apply', 'build']
