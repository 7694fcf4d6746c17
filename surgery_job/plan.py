"""The whole surgery planned on shapes and dtypes before any data moves.

The ops run once under `jax.make_jaxpr` on abstract inputs. That trace gives every output's shape,
dtype and derived spec, and its dataflow gives each output's source keys and which outputs are an
input passed through unchanged (those are never copied or recomputed).
"""

import dataclasses
import math
from typing import Any, Callable, Collection, Sequence

import jax
import jax.numpy as jnp
from jax.extend.core import Literal
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from surgery_job import cast_errors, checkpoint, keys, sharding, storage, transforms, tree
from surgery_job.errors import SurgeryError
from surgery_job.transforms import Leaf, State


@dataclasses.dataclass(frozen=True)
class OutputLeaf:
  shape: tuple[int, ...]
  dtype: Any
  spec: PartitionSpec
  sources: tuple[str, ...]  # Input keys its value is computed from.
  passthrough: str | None  # The input key whose array it is, unchanged; None if computed.

  @property
  def nbytes(self) -> int:
    return math.prod(self.shape) * self.dtype.itemsize


@dataclasses.dataclass(frozen=True)
class CastLeaf:
  """A leaf a cast op casts: its full key then, and the input keys its values come from."""
  key: str
  dtype: str
  allow_overflow: bool
  sources: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Group:
  """Output leaves streamed together: restored, transformed and written as one unit."""
  outputs: tuple[str, ...]
  inputs: tuple[str, ...]  # The input keys it restores; no other group restores them.
  host_bytes: int  # Per host: the inputs it reads and the outputs it writes, every shard counted.
  temp_bytes: int = 0  # Per host: XLA's temporaries of its transform's program, besides those.

  @property
  def peak_bytes(self) -> int:
    return self.host_bytes + self.temp_bytes


def host_bytes(x: jax.ShapeDtypeStruct) -> int:
  """Bytes of `x` held on this host: each addressable shard (on CPU devices, each one in RAM)."""
  shards = len(x.sharding.addressable_devices_indices_map(tuple(x.shape)))
  return shards * math.prod(x.sharding.shard_shape(tuple(x.shape))) * x.dtype.itemsize


@dataclasses.dataclass(frozen=True)
class Plan:
  mesh: Mesh
  layout: tree.Layout
  ops: Sequence[tuple[str, transforms.Op]]
  inputs: dict[str, jax.ShapeDtypeStruct]  # Every input leaf, with its sharding on `mesh`.
  outputs: dict[str, OutputLeaf]
  touched: list[tuple[str, list[str]]]  # (op label, keys it added, removed or changed).
  casts: tuple[CastLeaf, ...] = ()  # In the order the ops cast them.
  source_model_config: dict[str, Any] | None = None  # The input's config.json, which ops may read.
  model_config: dict[str, Any] | None = None  # The output's config.json, as the ops leave it.
  notes: tuple[str, ...] = ()  # What model family ops found.
  merge: Callable[[dict[str, Leaf]], dict[str, Leaf]] | None = None  # Several inputs into one tree.

  @property
  def needed(self) -> list[str]:
    """Input keys that some output reads; the others are never restored."""
    keys = {k for leaf in self.outputs.values() for k in leaf.sources}
    return [k for k in self.inputs if k in keys]

  @property
  def bytes_read(self) -> int:
    return self.inputs_bytes(self.needed)

  def inputs_bytes(self, keys) -> int:
    """Bytes of the input leaves `keys` on disk (their global size)."""
    return sum(math.prod(self.inputs[k].shape) * self.inputs[k].dtype.itemsize
               for k in keys)

  @property
  def bytes_written(self) -> int:
    return sum(leaf.nbytes for leaf in self.outputs.values())

  def output_sharding(self, key: str) -> NamedSharding:
    return NamedSharding(self.mesh, self.outputs[key].spec)

  def abstract_output(self, key: str) -> jax.ShapeDtypeStruct:
    leaf = self.outputs[key]
    return sharding.abstract(leaf.shape, leaf.dtype, self.mesh, leaf.spec)

  def groups(self, budget_bytes: int | None, temp_bytes: Callable[[Group], int] | None = None,
             copied: Collection[str] = ()) -> list[Group]:
    """The outputs cut into groups of at most `budget_bytes` per host (None: one group), counting
    `temp_bytes(group)` (per host, beside its arrays) when given. Outputs `copied` as their stored
    chunks are in none.

    Outputs that read a common input always share a group (stack, concat, copy and mean-padding
    read several leaves), so each input is restored once. A set of such outputs larger than the
    budget is a group of its own.
    """
    outputs = {key: leaf for key, leaf in self.outputs.items() if key not in copied}
    parent = {key: key for key in outputs}

    def root(key):
      while parent[key] != key:
        parent[key] = parent[parent[key]]
        key = parent[key]
      return key
    reader = {}
    for key, leaf in outputs.items():
      for source in leaf.sources:
        parent[root(key)] = root(reader.setdefault(source, key))
    components: dict[str, list[str]] = {}
    for key in outputs:
      components.setdefault(root(key), []).append(key)

    # Components share no input, so a group's bytes are the sum of its components' bytes.
    order = {key: index for index, key in enumerate(self.inputs)}

    def inputs_of(keys):
      return sorted({source for key in keys for source in self.outputs[key].sources}, key=order.get)

    def bytes_of(keys):
      # An output passed through is written from its input's arrays, but writing copies it to host.
      # A small input is read whole before it is cut into its shards.
      return (sum(host_bytes(self.inputs[k]) + checkpoint.whole_bytes(self.inputs[k])
                  for k in inputs_of(keys))
              + sum(host_bytes(self.abstract_output(k)) for k in keys))

    def pack(parts: list[list[str]], weight: float) -> list[list[list[str]]]:
      """`parts` in order, cut where their bytes times `weight` would pass the budget."""
      packed: list[tuple[list[list[str]], float]] = []
      for part in parts:
        size = bytes_of(part) * weight
        if packed and (budget_bytes is None or packed[-1][1] + size <= budget_bytes):
          packed[-1] = (packed[-1][0] + [part], packed[-1][1] + size)
        else:
          packed.append(([part], size))
      return [cut for cut, _ in packed]

    def group_of(parts: list[list[str]]) -> Group:
      keys = [key for part in parts for key in part]
      return Group(tuple(keys), tuple(inputs_of(keys)), bytes_of(keys))

    pending = pack(list(components.values()), 1.0)
    if temp_bytes is None or budget_bytes is None:
      return [group_of(parts) for parts in pending]
    # A group whose temporaries take it over the budget is cut again, its parts weighed by what
    # its arrays and temporaries came to together, until each fits or is one part.
    done = []
    while pending:
      parts = pending.pop(0)
      group = group_of(parts)
      group = dataclasses.replace(group, temp_bytes=temp_bytes(group))
      if group.peak_bytes <= budget_bytes or len(parts) == 1:
        done.append(group)
      else:
        pending[:0] = pack(parts, group.peak_bytes / group.host_bytes)
    return done


def read_ahead(groups: list[Group], budget_bytes: int | None, skip: Collection[int] = ()) -> set[int]:
  """The groups read while the group before them is written: those that fit in the budget
  (None: no bound) together with it. Groups in `skip` are not read at all."""
  return {index for index in range(1, len(groups)) if index not in skip and (
      budget_bytes is None or groups[index - 1].peak_bytes + groups[index].peak_bytes <= budget_bytes)}


def peak_bytes(groups: list[Group], read_ahead: Collection[int]) -> int:
  """The most host bytes the groups hold at once: one group, or two where one is read ahead."""
  return max([g.peak_bytes for g in groups] +
             [groups[i - 1].peak_bytes + groups[i].peak_bytes for i in read_ahead])


def abstract_inputs(metadata: dict[str, Any], key_impls: dict[str, str],
                    mesh: Mesh) -> dict[str, jax.ShapeDtypeStruct]:
  """Every input leaf as it is restored: with its saved spec fitted to `mesh`, and a typed PRNG key
  (`key_impls`) with its key dtype and logical shape, its key data's trailing axes dropped."""
  inputs = {}
  for key, meta in metadata.items():
    shape, dtype = tuple(meta.shape), meta.dtype
    spec = sharding.fit_spec(sharding.saved_spec(meta), shape, mesh, key)
    if key in key_impls:
      dtype = keys.key_dtype(key_impls[key])
      shape = shape[:len(shape) - keys.data_ndim(dtype)]
      spec = PartitionSpec(*tuple(spec)[:len(shape)])
    inputs[key] = sharding.abstract(shape, dtype, mesh, spec)
  return inputs


def run_state(plan_ops, layout: tree.Layout, inputs: dict[str, Leaf], touched=None,
              model_config: dict[str, Any] | None = None, merge=None) -> State:
  """The state after the ops; `model_config`: the input's config.json; `merge`: what makes one
  tree of several inputs first."""
  params, mirrors, others = layout.split(merge(inputs) if merge else inputs)
  return transforms.apply(plan_ops, State(params, mirrors, others, layout.params_root,
                                          model_config=model_config), touched)


def run_ops(plan_ops, layout: tree.Layout, inputs: dict[str, Leaf], touched=None,
            model_config: dict[str, Any] | None = None, merge=None) -> dict[str, Leaf]:
  return assemble(layout, run_state(plan_ops, layout, inputs, touched, model_config, merge))


def assemble(layout: tree.Layout, state: State) -> dict[str, Leaf]:
  flat = {tree.join(layout.params_root, k): leaf for k, leaf in state.params.items()}
  for root, mirror in state.mirrors.items():
    flat.update({tree.mirror_key(root, k): leaf for k, leaf in mirror.items()})
  flat.update(state.others)
  return flat


def make_plan(ops, layout: tree.Layout, inputs: dict[str, jax.ShapeDtypeStruct], mesh: Mesh,
              rules: Sequence[tuple[str, Any]], model_config: dict[str, Any] | None = None,
              merge=None) -> Plan:
  """`model_config`: the input's config.json, for the ops that read it; `merge`: a
  `merging.Stage` that makes one tree of several inputs before the ops run."""
  in_specs = {k: x.sharding.spec for k, x in inputs.items()}
  steps, specs, casts, final = [], {}, [], []

  def trace(values):
    with transforms.values.recording_casts() as records:
      state = run_state(ops, layout, {k: Leaf(values[k], in_specs[k]) for k in inputs}, steps,
                        model_config, merge)
      final.append(state)
      out = assemble(layout, state)
    specs.update({k: leaf.spec for k, leaf in out.items()})
    casts.extend(records)
    # Each cast's result is traced too: its sources say which group measures it.
    return {k: leaf.value for k, leaf in out.items()}, [r.result for r in records]

  closed, (out_shapes, _) = jax.make_jaxpr(trace, return_shape=True)(inputs)
  _check_keys(list(specs))
  cast_keys = [f'cast {i}' for i in range(len(casts))]
  sources, passthrough = _dataflow(closed.jaxpr, list(tree.flatten(inputs)),
                                   list(tree.flatten(out_shapes)) + cast_keys)
  outputs = {}
  for key, rule_spec in specs.items():
    shape, dtype = out_shapes[key].shape, out_shapes[key].dtype
    spec = rule_spec
    if spec is None:
      spec = sharding.rule_spec(rules, key, layout.names(key), shape, mesh)
    spec = sharding.fit_spec(spec, shape, mesh, key)
    source = passthrough.get(key)
    if source is not None and in_specs[source] != spec:
      source = None
    dtype = dtype if keys.is_key(dtype) else jnp.dtype(dtype)
    outputs[key] = OutputLeaf(tuple(shape), dtype, spec, tuple(sorted(sources[key])), source)
  _check_writable(outputs)
  cast_leaves = tuple(CastLeaf(r.key, r.dtype, r.allow_overflow, tuple(sorted(sources[name])))
                      for r, name in zip(casts, cast_keys))
  touched = (merge.touched if merge else []) + [(label, _diff(layout, a, b)) for label, a, b in steps]
  return Plan(mesh, layout, ops, inputs, outputs, touched, cast_leaves,
              source_model_config=model_config, model_config=final[0].model_config,
              notes=final[0].notes, merge=merge)


def _check_keys(keys: list[str]) -> None:
  """Every output key must nest (no empty parts, no key both a leaf and a parent) and have a
  storage name of its own (Orbax joins the parts with '.': `a.b/c` and `a/b.c` would collide)."""
  key_set = set(keys)
  owners = {}
  for key in keys:
    parts = key.split(tree.SEP)
    if not all(parts):
      raise SurgeryError(f'output key {key!r} has an empty part')
    for depth in range(1, len(parts)):
      parent = tree.SEP.join(parts[:depth])
      if parent in key_set:
        raise SurgeryError(f'output key {parent!r} is both a leaf and the parent of {key!r}')
    other = owners.setdefault(storage.name(key), key)
    if other != key:
      raise SurgeryError(f'output keys {other!r} and {key!r} would both be stored by Orbax as '
                         f'{storage.name(key)!r}; rename one')


def _check_writable(outputs: dict[str, OutputLeaf]) -> None:
  """Orbax refuses to save zero-size arrays: say so before any data moves."""
  for key, leaf in outputs.items():
    if 0 in leaf.shape:
      raise SurgeryError(f'output {key!r} has shape {leaf.shape}, with no elements; Orbax cannot '
                         'save zero-size arrays')


def _dataflow(jaxpr, in_keys: list[str], out_keys: list[str]):
  """(sources, passthrough): input keys each output depends on; outputs that are an input itself."""
  deps = {var: {key} for var, key in zip(jaxpr.invars, in_keys)}
  for eqn in jaxpr.eqns:
    found = set().union(*(deps.get(v, ()) for v in eqn.invars if not isinstance(v, Literal)))
    for var in eqn.outvars:
      deps[var] = found
  names = dict(zip(jaxpr.invars, in_keys))
  sources, passthrough = {}, {}
  for key, var in zip(out_keys, jaxpr.outvars):
    if isinstance(var, Literal):
      sources[key] = set()
      continue
    sources[key] = deps.get(var, set())
    if var in names:
      passthrough[key] = names[var]
  return sources, passthrough


def _diff(layout: tree.Layout, before: State, after: State) -> list[str]:
  old, new = assemble(layout, before), assemble(layout, after)
  changed = {k for k in old if k not in new or new[k] is not old[k]} | (new.keys() - old.keys())
  return sorted(changed)


def transform_fn(plan: Plan, group: Group):
  """The jitted surgery of one group: its inputs in (on their restored shardings); out, its
  computed outputs and the `cast_errors.statistics` of the casts of its inputs (keyed by index
  into `plan.casts`). None when the group only passes inputs through."""
  in_specs = {k: x.sharding.spec for k, x in plan.inputs.items()}
  computed = [k for k in group.outputs if plan.outputs[k].passthrough is None]
  if not computed:
    return None
  inputs = set(group.inputs)
  measured = [i for i, leaf in enumerate(plan.casts) if leaf.sources and set(leaf.sources) <= inputs]

  def compute(values):
    # Inputs of other groups are zeros here, which XLA drops as dead code: they are never read.
    leaves = {k: Leaf(values[k] if k in values else jnp.zeros(x.shape, x.dtype), in_specs[k])
              for k, x in plan.inputs.items()}
    with transforms.values.recording_casts() as records:
      out = run_ops(plan.ops, plan.layout, leaves, model_config=plan.source_model_config,
                    merge=plan.merge)
    return ({k: out[k].value for k in computed},
            {str(i): cast_errors.statistics(records[i].source, records[i].result) for i in measured})

  # Unchanged leaves keep the sharding they were restored with; computed ones get their planned
  # spec; the few numbers per cast come back replicated, for every process to read.
  return jax.jit(compute,
                 in_shardings=({k: plan.inputs[k].sharding for k in group.inputs},),
                 out_shardings=({k: plan.output_sharding(k) for k in computed},
                                NamedSharding(plan.mesh, PartitionSpec())))
