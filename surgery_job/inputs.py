"""What a run reads: one input, or several that merge ops combine (`inputs`, or several steps of one
CheckpointManager directory named by `input.step`).

In the plan each input's leaves are keyed `name:key` (the one input of a plain run keeps its keys),
so groups, restore, resume and the report work per key of each input: a group reads the same keys
of every input together.
"""

import dataclasses
import hashlib
import json
import re
from types import ModuleType
from typing import Any

import jax
import ml_collections
from jax.sharding import Mesh

from surgery_job import checkpoint, formats, output, paths, tree
from surgery_job.errors import SurgeryError
from surgery_job.transforms import merge as merge_lib

NAME_SEP = ':'  # Between an input's name and a key of it in the plan.
NAME = re.compile(r'[A-Za-z0-9_.-]+')
LAST = re.compile(r'last:([1-9][0-9]*)')


@dataclasses.dataclass(frozen=True)
class Input:
  name: str  # '' for the one input of a plain run.
  reader: ModuleType  # Its format's module.
  source: Any  # Where it is, as its reader locates it.
  skeleton: Any  # Its tree of metadata.
  metadata: dict[str, Any]  # The same, flat.

  def key(self, key: str) -> str:
    return f'{self.name}{NAME_SEP}{key}' if self.name else key

  def fingerprint(self) -> str:
    """Tells this input's bytes apart without reading them (each file's size, time and inode)."""
    return hashlib.sha256(json.dumps(paths.stamps(self.source.item_dir)).encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class Inputs:
  entries: tuple[Input, ...]  # In the order merge ops take them: a directory's steps oldest first.
  primary: Input  # Leaves no merge op makes, the layout and the output's step come from it.

  @property
  def names(self) -> list[str]:
    return [entry.name for entry in self.entries]

  def abstract_inputs(self, mesh: Mesh, layout: tree.Layout, rules) -> dict[str, jax.ShapeDtypeStruct]:
    """Every leaf of every input as it is read onto `mesh`, keyed as the plan keys it."""
    found = {}
    for entry in self.entries:
      leaves = entry.reader.abstract_inputs(entry.source, entry.metadata, layout, mesh, rules)
      found.update({entry.key(k): x for k, x in leaves.items()})
    return found

  def restore(self, wanted: dict[str, jax.ShapeDtypeStruct]) -> dict[str, jax.Array]:
    """The `wanted` leaves (plan keys), each input reading its own."""
    restored, parts = {}, self._per_input(wanted)
    for entry in self.entries:
      mine = parts[entry.name]
      if not mine:
        continue
      try:
        leaves = entry.reader.restore(entry.source, entry.skeleton, mine)
      except SurgeryError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        source = entry.source
        if source.step is not None and not source.item_dir.exists():
          raise SurgeryError(f'input.step {source.step} not found in {source.root}: deleted while '
                             'it was read') from None
        raise SurgeryError(checkpoint.read_error(e, source.item_dir)) from None
      restored.update({entry.key(k): v for k, v in leaves.items()})
    return restored

  def _per_input(self, flat: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """`flat` (plan keys) split by input, keyed within it."""
    if len(self.entries) == 1:
      return {self.primary.name: flat}
    parts = {name: {} for name in self.names}
    for plan_key, value in flat.items():
      name, key = split(plan_key)
      parts[name][key] = value
    return parts

  def held_bytes(self) -> int:
    return sum(entry.reader.held_bytes(entry.source) for entry in self.entries)

  def fingerprint(self, config) -> str:
    """What makes two runs the same surgery (`output.fingerprint`), with every input's place and
    the primary input's config.json, which ops read and a safetensors output carries."""
    primary = output.fingerprint(config, self.primary.source)
    model_config = self.primary.reader.model_config(self.primary.source)
    if model_config is not None:
      primary = hashlib.sha256(json.dumps([primary, model_config], sort_keys=True).encode()).hexdigest()
    if len(self.entries) == 1:
      return primary
    places = [[e.name, paths.real(e.source.root), e.source.step, e.source.item] for e in self.entries]
    return hashlib.sha256(json.dumps([primary, places], default=str).encode()).hexdigest()

  def resume_key(self, run_fingerprint: str) -> dict:
    """`output.resume_key`, the bytes of every input told apart."""
    key = output.resume_key(run_fingerprint, self.primary.source)
    if len(self.entries) > 1:
      key['input'] = hashlib.sha256(' '.join(e.fingerprint() for e in self.entries).encode()).hexdigest()
    return key

  def add_to_report(self, report: dict, plan) -> None:
    """With several inputs: each one (name, path, step, fingerprint), and the inputs of each leaf."""
    if len(self.entries) == 1:
      return
    report['inputs'] = {e.name: {'path': str(e.source.root), 'step': e.source.step,
                                 'item': getattr(e.source, 'item', None),
                                 'fingerprint': e.fingerprint()} for e in self.entries}
    for key, leaf in report['leaves'].items():
      leaf['inputs'] = sorted({split(k)[0] for k in plan.outputs[key].sources})


def split(plan_key: str) -> tuple[str, str]:
  """(input name, key) of a plan key of one of several inputs (names hold no ':')."""
  name, _, key = plan_key.partition(NAME_SEP)
  return name, key


def merges_in(config) -> bool:
  """Whether the config's ops combine several inputs."""
  return any(op.get('op') in merge_lib.OPS for op in config.transforms)


def last_n(step: Any) -> int | None:
  """N of an `input.step` of 'last:N', else None."""
  found = LAST.fullmatch(step) if isinstance(step, str) else None
  return int(found.group(1)) if found else None


def window(config, newest: int) -> tuple[int, ...]:
  """The steps a merge of `input.step` 'last:N' reads for output step `newest`: the N newest
  committed steps up to it."""
  count = last_n(config.input.step)
  assert count is not None
  reader = formats.reader(config.input.path, config.input.format)
  committed = [s for s in reader.select_steps(config.input.path, 'all', lambda s: False)
               if s is not None and s <= newest]
  if len(committed) < count:
    raise SurgeryError(f"input.step 'last:{count}' needs {count} committed steps up to step "
                       f'{newest} of {config.input.path}, found {len(committed)}: {committed}')
  return tuple(committed[-count:])


def locate(config, steps: Any) -> Inputs:
  """Every input of one run, read to its metadata. `steps`: the step of a plain run, a tuple of
  steps of `input.path` to merge, or None with `inputs`."""
  if config.inputs:
    entries = [_read(name, fields, fields.step) for name, fields in config.inputs.items()]
    _refuse_twice(entries)
    return Inputs(tuple(entries), entries[0])
  if isinstance(steps, tuple):
    entries = [_read(str(step), config.input, step) for step in steps]
    return Inputs(tuple(entries), entries[-1])
  entry = _read('', config.input, steps)
  return Inputs((entry,), entry)


def _read(name: str, input_config, step: Any) -> Input:
  try:
    reader = formats.reader(input_config.path, input_config.format)
    source = reader.locate(input_config, step)
    skeleton = reader.read_metadata(source)
  except SurgeryError as e:
    raise (e.within(f'input {name}') if name else e) from None
  return Input(name, reader, source, skeleton, tree.flatten(skeleton))


def _refuse_twice(entries: list[Input]) -> None:
  seen = {}
  for entry in entries:
    place = (paths.real(entry.source.item_dir), entry.source.step)
    if place in seen:
      raise SurgeryError(f'inputs {seen[place]} and {entry.name} are the same checkpoint '
                         f'({entry.source.item_dir})')
    seen[place] = entry.name


def resolve(config: ml_collections.ConfigDict, default_input: ml_collections.ConfigDict) -> None:
  """Checks `inputs` (each like `input`, names without ':' or '/') and the step forms that name
  several steps, in place."""
  if config.inputs and config.input.path:
    raise SurgeryError('config: set input.path or inputs, not both')
  resolved = {}
  for name, fields in config.inputs.items():
    if not NAME.fullmatch(name):
      raise SurgeryError(f'config: input name {name!r} must hold letters, digits, "_", "-" or "." only')
    if not isinstance(fields, (dict, ml_collections.ConfigDict)):
      raise SurgeryError(f'config: inputs.{name} must be a group of fields like input, got {fields!r}')
    entry = ml_collections.ConfigDict(default_input.to_dict())
    for field, value in dict(fields).items():
      if field not in entry:
        raise SurgeryError(f'config: unknown field inputs.{name}.{field!r} '
                           f'(known: {", ".join(sorted(entry.keys()))})')
      entry[field] = value
    if not entry.path:
      raise SurgeryError(f'config: missing field inputs.{name}.path')
    if not (entry.step in (None, 'latest') or _is_step(entry.step)):
      raise SurgeryError(f"config: inputs.{name}.step must be a step number, None or 'latest', "
                         f'got {entry.step!r}')
    resolved[name] = entry
  config.inputs = ml_collections.ConfigDict(resolved)
  step = config.input.step
  if isinstance(step, range):
    config.input.step = step = list(step)
  if last_n(step) is not None and not merges_in(config):
    raise SurgeryError(f"config: input.step {step!r} names steps to combine, but no op combines "
                       f'them (one of: {", ".join(merge_lib.OPS)})')
  if isinstance(step, (list, tuple)) and merges_in(config) and len(set(step)) < len(step):
    twice = next(s for s in step if list(step).count(s) > 1)
    raise SurgeryError(f'config: input.step names step {twice} twice')


def _is_step(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value >= 0
