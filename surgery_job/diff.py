"""`surgery-job-diff A B`: what differs between two Orbax checkpoints, or between a surgery's spec
and its output. Exit 0 when equal, 1 when different, 2 on bad input (one line on stderr).

  surgery-job-diff A B                        # keys, shapes, dtypes and saved specs (metadata only)
  surgery-job-diff A B --values               # and every value, bit for bit, group by group
  surgery-job-diff A B --values --map configs/scan_layers.py:layers   # B against A run through the config

A and B are CheckpointManager directories (their latest committed step), step folders of one,
single PyTree checkpoints, or Flax msgpack checkpoints (read as the job reads them). With `--map`,
A's leaves go through the config's transforms with the job's own plan, in memory, and the result
is what B is compared with: a reviewer checks a conversion against its own spec. `--values`
streams the leaves in the job's groups, restoring only one group of A and B at a time
(`--host_budget_gb`), on as many processes as the job runs on (`--coordinator_address
--num_processes --process_id`, or a cluster JAX detects).
"""

import functools
import json
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from surgery_job import (
  checkpoint,
  cli,
  config as config_lib,
  distributed,
  keys,
  memory,
  plan as plan_lib,
  sharding,
  transforms,
  tree,
  validate,
)
from surgery_job.errors import SurgeryError

PROG = 'surgery-job-diff'
EXIT_EQUAL, EXIT_DIFFERENT = 0, 1


def _describe(shape, dtype, spec) -> dict:
  return {'shape': list(shape), 'dtype': str(dtype), 'spec': cli.spec_text(spec)}


def compare_metadata(expected: dict[str, dict], actual: dict[str, dict]) -> dict:
  """Keys only in A (expected), only in B (actual), and leaves whose shape, dtype or spec differ."""
  return {'only_in_a': {k: v for k, v in expected.items() if k not in actual},
          'only_in_b': {k: v for k, v in actual.items() if k not in expected},
          'changed': {k: {'a': expected[k], 'b': actual[k]} for k in expected
                      if k in actual and expected[k] != actual[k]}}


def _leaf_stats(a: jax.Array, b: jax.Array) -> dict[str, jax.Array]:
  """How far `b` is from `a`: differing values (by their bits), the largest absolute difference
  and the largest magnitude in `a` (NaN for PRNG keys, which have no magnitude)."""
  words_a, words_b = validate.words(a), validate.words(b)
  same = jnp.all(words_a == words_b, axis=tuple(range(a.ndim, words_a.ndim)))
  differing = jnp.sum(~same, dtype=jnp.int64)
  if keys.is_key(a.dtype):
    return {'differing': differing, 'max_abs': jnp.float64(jnp.nan), 'scale': jnp.float64(jnp.nan)}
  wide = jnp.promote_types(a.dtype, jnp.float32)
  wide_a, wide_b = a.astype(wide), b.astype(wide)
  gap = jnp.where(same, 0, jnp.abs(wide_a - wide_b))
  gap = jnp.where(jnp.isnan(gap), jnp.inf, gap)  # A NaN on one side only is as far as it gets.
  scale = jnp.where(jnp.isfinite(wide_a), jnp.abs(wide_a), 0)
  return {'differing': differing, 'max_abs': jnp.max(gap, initial=0).astype(jnp.float64),
          'scale': jnp.max(scale, initial=0).astype(jnp.float64)}


def compare_values(pairs: dict[str, tuple[jax.Array, jax.Array]], mesh) -> dict[str, dict]:
  """{key: {'equal', 'differing', 'size', 'max_abs', 'max_rel'}} of each (a, b) pair; `max_rel`
  is the largest absolute difference over the largest finite magnitude in a."""
  # Each pair stays on the sharding it was restored with; the few numbers per leaf come back
  # replicated, so every process reads the same result from its own devices.
  stats = jax.jit(lambda p: {k: _leaf_stats(a, b) for k, (a, b) in p.items()},
                  out_shardings=NamedSharding(mesh, PartitionSpec()))(pairs)
  stats = distributed.wait_ready(stats)
  result = {}
  for key, found in stats.items():
    found = {name: np.asarray(x.addressable_data(0)).item() for name, x in found.items()}
    equal = found['differing'] == 0
    max_abs = None if np.isnan(found['max_abs']) else float(found['max_abs'])
    max_rel = None
    if max_abs is not None:
      max_rel = (0.0 if max_abs == 0 else float('inf') if found['scale'] == 0
                 else max_abs / found['scale'])
    result[key] = {'equal': equal, 'differing': int(found['differing']),
                   'size': int(np.prod(pairs[key][0].shape)), 'max_abs': max_abs, 'max_rel': max_rel}
  return result


def diff(a_path: str, b_path: str, config_spec: str | None = None, values: bool = False,
         host_budget_gb: float | None = None) -> dict:
  """Everything the diff finds, as the JSON it prints with `--json`; 'equal' sums it up."""
  # As in the job: 64-bit leaves are compared as they are.
  with jax.enable_x64(True):
    return _diff(a_path, b_path, config_spec, values, host_budget_gb)


def _diff(a_path, b_path, config_spec, values, host_budget_gb) -> dict:
  config = cli.load_config(config_spec) if config_spec else config_lib.get_default_config()
  (a_reader, a), (b_reader, b) = cli.locate(a_path, None, config.input), cli.locate(b_path)
  config.input.path, config.dry_run = str(a.root), True
  config = config_lib.resolve(config)
  a_skeleton, b_skeleton = a_reader.read_metadata(a), b_reader.read_metadata(b)
  a_metadata, b_metadata = tree.flatten(a_skeleton), tree.flatten(b_skeleton)
  mesh = sharding.make_mesh(config.mesh.shape, config.mesh.axes,
                            sharding.saved_mesh_shape(list(a_metadata.values())), jax.devices())
  try:
    layout = tree.find_layout(list(a_metadata), config.params_root)
  except ValueError as e:
    raise SurgeryError(f'config: {e}') from None
  a_inputs = a_reader.abstract_inputs(a, a_metadata, layout, mesh, config.partition_rules)
  # A msgpack or safetensors B records no specs: it is laid out as A would be, by the config's
  # partition rules.
  b_leaves = b_reader.abstract_inputs(b, b_metadata, layout, mesh, config.partition_rules)
  # Without a config this is the empty surgery: every output is its input, passed through.
  plan = plan_lib.make_plan(transforms.build(config.transforms), layout, a_inputs, mesh,
                            config.partition_rules, a_reader.model_config(a))
  expected = {k: _describe(leaf.shape, leaf.dtype, leaf.spec) for k, leaf in plan.outputs.items()}
  if not b_reader.RECORDS_SHARDINGS:
    # B has no specs of its own to compare: each leaf is taken as A's mapped spec for it.
    b_leaves = {k: plan.abstract_output(k) if k in plan.outputs else x for k, x in b_leaves.items()}
  actual = {k: _describe(x.shape, x.dtype, x.sharding.spec) for k, x in b_leaves.items()}
  found = {'a': str(a.item_dir), 'b': str(b.item_dir), 'map': config_spec,
           **compare_metadata(expected, actual)}
  equal = not any(found[part] for part in ('only_in_a', 'only_in_b', 'changed'))
  if values:
    comparable = {k for k in expected if k in actual and
                  (expected[k]['shape'], expected[k]['dtype']) == (actual[k]['shape'], actual[k]['dtype'])}
    budget = None if host_budget_gb is None else int(host_budget_gb * 1e9)
    found['values'] = {}
    for group in plan.groups(budget):
      found['values'].update(_compare_group(plan, group, comparable, (a_reader, a, a_skeleton),
                                            (b_reader, b, b_skeleton)))
    equal = equal and all(v['equal'] for v in found['values'].values())
  found['equal'] = equal
  return found


def _compare_group(plan, group, comparable, a_read, b_read) -> dict[str, dict]:
  """One group, as the job streams it: A's inputs restored and transformed, B's leaves restored,
  compared, and freed before the next group. `a_read`, `b_read`: (format module, location, tree)."""
  (a_reader, a, a_skeleton), (b_reader, b, b_skeleton) = a_read, b_read
  outputs = [k for k in group.outputs if k in comparable]
  if not outputs:
    return {}
  try:
    restored = a_reader.restore(a, a_skeleton, {k: plan.inputs[k] for k in group.inputs})
  except Exception as e:  # pylint: disable=broad-except
    raise SurgeryError(checkpoint.read_error(e, a.item_dir)) from None
  transform = plan_lib.transform_fn(plan, group)
  computed, _ = transform(restored) if transform else ({}, {})
  mapped = {k: computed[k] if plan.outputs[k].passthrough is None
            else restored[plan.outputs[k].passthrough] for k in outputs}
  del restored, computed
  try:
    written = b_reader.restore(b, b_skeleton, {k: plan.abstract_output(k) for k in outputs})
  except Exception as e:  # pylint: disable=broad-except
    raise SurgeryError(checkpoint.read_error(e, b.item_dir)) from None
  result = compare_values({k: (mapped[k], written[k]) for k in outputs}, plan.mesh)
  del mapped, written
  memory.release()
  return result


def _strict_json(value: Any) -> Any:
  """`value` with inf and NaN as strings, which strict JSON readers (jq) accept."""
  if isinstance(value, dict):
    return {k: _strict_json(v) for k, v in value.items()}
  if isinstance(value, float) and not np.isfinite(value):
    return str(value)
  return value


def _number(x: float | None) -> str:
  return 'n/a' if x is None else f'{x:.3g}'


def render(found: dict) -> str:
  """One line per difference, one per leaf compared by value, then the verdict."""
  lines = [f"A: {found['a']}" + (f" mapped by {found['map']}" if found['map'] else ''),
           f"B: {found['b']}"]
  for part, label in (('only_in_a', 'only in A'), ('only_in_b', 'only in B')):
    lines += [f"{label}: {k} {tuple(v['shape'])} {v['dtype']} {v['spec']}" for k, v in found[part].items()]
  for key, change in found['changed'].items():
    parts = [f'{field} {change["a"][field]} -> {change["b"][field]}'.replace('[', '(').replace(']', ')')
             if field == 'shape' else f'{field} {change["a"][field]} -> {change["b"][field]}'
             for field in ('shape', 'dtype', 'spec') if change['a'][field] != change['b'][field]]
    lines.append(f"changed: {key}: {', '.join(parts)}")
  compared = found.get('values')
  if compared is not None:
    for key, v in compared.items():
      lines.append(f'bit-equal: {key}' if v['equal'] else
                   f"differs: {key}: {v['differing']} of {v['size']} values, max abs "
                   f"{_number(v['max_abs'])}, max rel {_number(v['max_rel'])}")
  summary = (f"{len(found['only_in_a'])} only in A, {len(found['only_in_b'])} only in B, "
             f"{len(found['changed'])} changed")
  if compared is not None:
    summary += (f"; {sum(v['equal'] for v in compared.values())} of {len(compared)} leaves "
                'bit-equal')
  lines.append(('EQUAL: ' if found['equal'] else 'DIFFERENT: ') + summary)
  return '\n'.join(lines)


def main(argv: list[str], join_cluster: bool = False) -> int:
  """The command; `join_cluster`: first join the cluster the flags name or JAX detects (a
  process that has already used JAX, as a test, cannot)."""
  parser = cli.Parser(prog=PROG, description=__doc__)
  parser.add_argument('a', help='checkpoint A (with --map: the surgery input)')
  parser.add_argument('b', help='checkpoint B (with --map: the surgery output)')
  parser.add_argument('--values', action='store_true', help='compare every value, bit for bit')
  parser.add_argument('--map', metavar='CONFIG', help='compare B with A run through this surgery '
                      'config (configs/NAME.py[:ARG])')
  parser.add_argument('--host_budget_gb', type=float, help='per host: compare in groups whose '
                      'arrays fit this many GB (as memory.host_budget_gb)')
  parser.add_argument('--json', action='store_true', help='print JSON instead of lines')
  parser.add_argument('--coordinator_address', help='host:port of process 0')
  parser.add_argument('--num_processes', type=int, help='number of processes, as the job takes it')
  parser.add_argument('--process_id', type=int, help='this process index, 0-based')
  args = parser.parse_args(argv)
  if args.host_budget_gb is not None and args.host_budget_gb <= 0:
    parser.error(f'--host_budget_gb must be positive, got {args.host_budget_gb}')
  if join_cluster:
    memory.few_arenas()
    distributed.initialize(args.coordinator_address, args.num_processes, args.process_id,
                           heartbeat_timeout_seconds=60, init_timeout_seconds=300)
  found = diff(args.a, args.b, args.map, args.values, args.host_budget_gb)
  if jax.process_index() == 0:
    print(json.dumps(_strict_json(found), indent=1) if args.json else render(found))
  return EXIT_EQUAL if found['equal'] else EXIT_DIFFERENT


def run() -> None:
  """The console script."""
  sys.exit(cli.run(PROG, functools.partial(main, join_cluster=True)))


if __name__ == '__main__':
  run()
