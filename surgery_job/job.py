"""The surgery job, phase by phase: read, mesh, plan, restore, transform, write, validate, commit."""

import contextlib
import json
import time
from pathlib import Path

import jax
import ml_collections
from absl import logging

from surgery_job import (checkpoint, config as config_lib, distributed, faults, output,
                         plan as plan_lib, report as report_lib, sharding, transforms, tree)
from surgery_job.errors import SurgeryError
from surgery_job.validate import mismatches


class Phases:
  """Times each phase; process 0 logs one line per phase."""

  def __init__(self):
    self.seconds: dict[str, float] = {}

  @contextlib.contextmanager
  def __call__(self, name: str):
    start = time.perf_counter()
    faults.at(name)
    yield
    self.seconds[name] = round(time.perf_counter() - start, 3)
    if jax.process_index() == 0:
      logging.info('Phase %-9s done in %.2f s', name, self.seconds[name])


def abandon(user_config: ml_collections.ConfigDict | None) -> None:
  """Removes the staging folder of a run that another process failed (process 0 only)."""
  path = user_config.get('output', {}).get('path') if user_config is not None else None
  if path and jax.process_index() == 0:
    with contextlib.suppress(Exception):
      output.Staging(Path(path).absolute()).clean()


def run(user_config: ml_collections.ConfigDict, barrier_timeout_seconds: int = 600) -> dict | None:
  """Runs the surgery `user_config` describes; returns its report (None for a dry run)."""
  config = config_lib.resolve(user_config)

  def barrier(name):
    distributed.barrier(f'surgery_job:{name}', barrier_timeout_seconds)

  phases = Phases()

  with phases('read'):
    source = checkpoint.locate(config.input.path, config.input.step, config.input.item)
    skeleton = checkpoint.read_metadata(source)
    metadata = tree.flatten(skeleton)
    try:
      layout = tree.find_layout(list(metadata), config.params_root)
    except ValueError as e:
      raise SurgeryError(f'config: {e}') from None
    run_fingerprint = output.fingerprint(config, source)
    out_root, out_step = _output(config, source)
    if out_root.exists() and output.existing_fingerprint(out_root) == run_fingerprint:
      if jax.process_index() == 0:
        logging.info('Already done: %s holds this surgery of %s (fingerprint %s).', out_root,
                     source.item_dir, run_fingerprint[:12])
      return json.loads((out_root / report_lib.REPORT).read_text())
    if out_root.exists() and not config.output.overwrite:
      found = output.existing_fingerprint(out_root)
      raise SurgeryError(f'output.path {out_root} exists' + (
          f' and holds another surgery (fingerprint {found[:12]}, this run {run_fingerprint[:12]})'
          if found else '') + '; set output.overwrite=True to replace it')

  with phases('mesh'):
    mesh = sharding.make_mesh(config.mesh.shape, config.mesh.axes,
                              sharding.saved_mesh_shape(list(metadata.values())), jax.devices())
    if jax.process_index() == 0:
      logging.info('Mesh %s over %d devices, %d processes.', dict(mesh.shape), mesh.size,
                   jax.process_count())

  with phases('plan'):
    # Each leaf is restored with the spec it was saved with, fitted to this job's mesh.
    inputs = {k: sharding.abstract(m.shape, m.dtype, mesh, sharding.fit_spec(
        sharding.saved_spec(m), m.shape, mesh, k)) for k, m in metadata.items()}
    plan = plan_lib.make_plan(transforms.build(config.transforms), layout, inputs, mesh,
                              config.partition_rules)

  if config.dry_run:
    if jax.process_index() == 0:
      print(describe(plan, source, out_root, out_step))
    return None

  staging = output.Staging(out_root)
  if jax.process_index() == 0:
    staging.create(run_fingerprint)
  barrier('staged')
  committed = False
  try:
    with phases('restore'):
      try:
        restored = checkpoint.restore(source.item_dir, skeleton, {k: inputs[k] for k in plan.needed})
      except Exception as e:  # pylint: disable=broad-except
        raise SurgeryError(checkpoint.read_error(e, source.item_dir)) from None
    with phases('transform'):
      computed = plan_lib.transform_fn(plan)(restored)
      jax.block_until_ready(computed)
    outputs = {k: restored[leaf.passthrough] if leaf.passthrough else computed[k]
               for k, leaf in plan.outputs.items()}
    out_skeleton = tree.unflatten(outputs, skeleton)
    with phases('write'):
      item_dir = checkpoint.save(out_skeleton, staging.checkpoint, source, out_step)
      faults.corrupt_output(item_dir)
      barrier('written')
    with phases('validate'):
      _validate(item_dir, out_skeleton, outputs, plan)
    report = report_lib.build(config, plan, source, out_root, out_step, phases.seconds,
                              run_fingerprint)
    with phases('commit'):
      if jax.process_index() == 0:
        report_lib.write(report, staging.checkpoint)
        staging.commit()
        faults.at('renamed')
      barrier('committed')
      committed = True
    report['seconds'] = phases.seconds
    return report
  finally:
    if not committed and jax.process_index() == 0:
      with contextlib.suppress(Exception):
        staging.clean()


def _validate(item_dir: Path, out_skeleton, outputs: dict, plan: plan_lib.Plan) -> None:
  """Reads the written checkpoint back with the planned shardings; every bit must match."""
  targets = {k: sharding.abstract(v.shape, v.dtype, plan.mesh, plan.outputs[k].spec)
             for k, v in outputs.items()}
  try:
    written = checkpoint.restore(item_dir, out_skeleton, targets)
  except Exception as e:  # pylint: disable=broad-except
    raise RuntimeError(f'validation failed: {checkpoint.read_error(e, item_dir)}') from None
  bad = mismatches(outputs, written)
  if bad:
    raise RuntimeError(f'validation failed: {len(bad)} leaves differ on disk, first {bad[0]!r}')


def _output(config, source: checkpoint.Location) -> tuple[Path, int | None]:
  out_root = Path(config.output.path).absolute()
  if checkpoint.inside(out_root, source.root):
    raise SurgeryError(f'output.path {out_root} is inside input.path {source.root}')
  if checkpoint.inside(source.root, out_root):
    raise SurgeryError(f'input.path {source.root} is inside output.path {out_root}')
  if source.step is None:
    if config.output.step is not None:
      raise SurgeryError('output.step is set but the input is a single PyTree checkpoint')
    return out_root, None
  return out_root, source.step if config.output.step is None else config.output.step


def describe(plan: plan_lib.Plan, source, out_root: Path, out_step) -> str:
  """The dry run's printout: ops, every output leaf with its spec and sources, and the I/O."""
  lines = [f'Surgery plan: {source.item_dir} -> {out_root}'
           + (f' (step {out_step})' if out_step is not None else ''),
           f'Mesh: {dict(plan.mesh.shape)}']
  for label, keys in plan.touched:
    lines.append(f'{label}: {len(keys)} keys: {", ".join(keys[:8])}{" ..." if len(keys) > 8 else ""}')
  lines.append(f'Output leaves ({len(plan.outputs)}):')
  for key, leaf in plan.outputs.items():
    how = 'unchanged' if leaf.passthrough == key else f'from {", ".join(leaf.sources) or "nothing"}'
    lines.append(f'  {key} {leaf.shape} {leaf.dtype.name} {tuple(leaf.spec)} {how}')
  lines.append(f'Reads {len(plan.needed)} of {len(plan.inputs)} leaves ({plan.bytes_read} bytes); '
               f'writes {len(plan.outputs)} leaves ({plan.bytes_written} bytes).')
  return '\n'.join(lines)
