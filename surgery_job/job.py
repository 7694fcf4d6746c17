"""The surgery job, phase by phase: read, mesh, plan, restore, transform, write, validate, commit."""

import concurrent.futures
import contextlib
import dataclasses
import json
import time
from typing import Callable

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from surgery_job import (
  cast_errors as cast_errors_lib,
  checkpoint,
  cli,
  config as config_lib,
  distributed,
  faults,
  formats,
  inputs as inputs_lib,
  memory,
  merging,
  output,
  paths,
  plan as plan_lib,
  programs as programs_lib,
  report as report_lib,
  sharding,
  stopping,
  stored_chunks,
  transforms,
  tree,
  validate,
)
from surgery_job.errors import SurgeryError
from surgery_job.families import hf_config
from surgery_job.progress import Progress


class BadStagedOutput(RuntimeError):
  """The staged checkpoint cannot be finalized, or reads back other than computed: a rerun
  resuming from it would fail the same way, so nothing of it is kept."""


class Phases:
  """Times each phase; process 0 logs one line per phase."""

  def __init__(self):
    self.seconds: dict[str, float] = {}

  @contextlib.contextmanager
  def __call__(self, name: str, log: bool = True):
    """Times one phase, or (with `log=False`) one group's share of a streamed phase."""
    stopping.check()
    start = time.perf_counter()
    faults.at(name)
    yield
    seconds = time.perf_counter() - start
    self.seconds[name] = round(self.seconds.get(name, 0.0) + seconds, 3)
    if log:
      self.log(name)

  def log(self, name: str, groups: int = 1) -> None:
    if jax.process_index() == 0:
      logging.vlog(1, 'Phase %-9s done in %.2f s%s', name, self.seconds[name],
                   f' over {groups} groups' if groups > 1 else '')

  def summary(self) -> str:
    return ', '.join(f'{name} {seconds:.2f}' for name, seconds in self.seconds.items())


def run(user_config: ml_collections.ConfigDict, barrier_timeout_seconds: int = 600) -> list[dict]:
  """Runs the surgery `user_config` describes on each input step it names, one after another,
  each committed on its own; returns their reports (none for a dry run)."""
  config = config_lib.resolve(user_config)
  transforms.build(config.transforms)  # A bad op fails here, before any checkpoint is read.
  # 64-bit leaves (int64 counters, float64 numpy arrays) pass through bit for bit only with x64 on;
  # every op names the dtypes it creates, so nothing else changes.
  jax.config.update('jax_enable_x64', True)
  out_root = paths.of(config.output.path, 'output.path') if config.output.path else None
  if config.inputs:
    if config.watch.enabled:
      raise SurgeryError('config: watch.enabled follows the steps of input.path, not inputs')
    return [report for report in [convert(config, None, barrier_timeout_seconds, False)] if report]
  reader = formats.reader(config.input.path, config.input.format)
  last_n = inputs_lib.last_n(config.input.step)

  def choose_steps(step_spec) -> list:
    # The output is listed once per choice, not once per input step.
    kept = output.steps(out_root) if out_root is not None and out_root.is_dir() else []
    held = set(kept) | (output.exported_before(out_root) if out_root is not None else set())
    keep = config.output.max_to_keep

    def exported(step: int) -> bool:
      """Whether the output has or ever had `step` (since deleted by pruning or by hand), or would
      let it go at once (older than every step it keeps, with max_to_keep of them)."""
      return step in held or (keep is not None and len(kept) >= keep and step < min(kept))
    if last_n is None:
      return reader.select_steps(config.input.path, step_spec, exported)
    # Each output step of 'last:N' is the newest of the N steps it averages.
    committed = reader.select_steps(config.input.path, 'all', exported)
    if step_spec != 'new':
      return committed[-1:]
    return [s for s in committed[last_n - 1:] if not exported(s)]

  def agree_on_steps(step_spec):
    if step_spec in ('all', 'new') and out_root is not None and jax.process_index() == 0:
      _sweep_abandoned(config, out_root)
    return distributed.agree('steps', lambda: choose_steps(step_spec), barrier_timeout_seconds)

  if config.watch.enabled:
    return _watch(config, out_root, barrier_timeout_seconds, agree_on_steps)
  steps = agree_on_steps(config.input.step)
  if isinstance(config.input.step, (list, tuple)) and inputs_lib.merges_in(config):
    return [report for report in [convert(config, tuple(steps), barrier_timeout_seconds, False)]
            if report]
  if len(steps) > 1 and config.output.step is not None:
    raise SurgeryError(f'config: output.step is set but input.step names {len(steps)} steps')
  if not steps:
    if jax.process_index() == 0:
      logging.info('Nothing to convert: every committed step of %s is in %s.', config.input.path,
                   out_root)
    _prune(config, out_root)  # What an earlier run stopped midway.
  if config.input.step in ('all', 'new'):
    return [report for step in steps
            if (report := _convert_unless_deleted(config, step, barrier_timeout_seconds))]
  return [report for step in steps
          if (report := convert(config, step, barrier_timeout_seconds, len(steps) > 1))]


def _watch(config, out_root: paths.Path | None, barrier_timeout_seconds: int,
           agree_on_steps) -> list[dict]:
  """Converts each new committed input step as it appears, until none has for the idle timeout."""
  if config.input.step not in (None, 'new') and inputs_lib.last_n(config.input.step) is None:
    raise SurgeryError(f"config: watch.enabled converts input.step='new' or 'last:N', not "
                       f'{config.input.step!r}')
  if config.output.step is not None:
    raise SurgeryError('config: output.step is set but watch.enabled converts each new input step '
                       'into its own output step')
  _prune(config, out_root)  # What an earlier run stopped midway.
  reports, idle_since = [], time.monotonic()
  if jax.process_index() == 0:
    logging.info('Watching %s for new committed steps every %.0f s.', config.input.path,
                 config.watch.poll_seconds)
  while True:
    steps = agree_on_steps('new') if paths.of(config.input.path, 'input.path').exists() else []
    reports += [report for step in steps
                if (report := _convert_unless_deleted(config, step, barrier_timeout_seconds))]
    if steps:
      idle_since = time.monotonic()
    elif time.monotonic() - idle_since >= config.watch.idle_timeout_seconds:
      if jax.process_index() == 0:
        logging.info('No new step for %.0f s: the watch ends.', config.watch.idle_timeout_seconds)
      return reports
    stopping.sleep(config.watch.poll_seconds)


def _sweep_abandoned(config, out_root: paths.Path) -> None:
  """Before a run of 'all' or 'new' (or a watch's poll) chooses its steps: what stopped runs left
  in the output for input steps that are gone goes, as no run will come back for it."""
  if not out_root.is_dir():
    return
  try:
    steps = formats.reader(config.input.path, config.input.format).select_steps(
        config.input.path, 'all', lambda s: False)
  except SurgeryError:  # No input to compare with: leave everything.
    return
  output.sweep_abandoned(out_root, set(steps), config.output.lock_timeout_seconds)


def _convert_unless_deleted(config, step, barrier_timeout_seconds: int) -> dict | None:
  """`convert` of a step the job chose itself ('all', 'new', a watch); one that failed because it
  (or, with 'last:N', a step of the N it averages) was deleted while it was read (the trainer
  keeping its newest steps) is skipped with a warning."""
  read = (step,)
  try:
    if inputs_lib.last_n(config.input.step) is not None:
      read = inputs_lib.window(config, step)
    return convert(config, read if len(read) > 1 else step, barrier_timeout_seconds, named=True)
  except Exception:  # pylint: disable=broad-except  # Whatever a vanished file made fail.
    gone = [] if stopping.requested.is_set() else _gone(config, read)
    if not gone:
      raise
    logging.warning('Skipping input step %s: %s no longer a committed step of the input (deleted '
                    'while it was read, as by the trainer keeping its newest steps).', step,
                    'it is' if gone == [step] else f'step {gone[0]}, one of the steps it averages, is')
    return None


def _gone(config, steps, settle_seconds: float = 2.0) -> list:
  """The `steps` that are no longer committed input steps, looked at again once a deletion under
  way (a trainer's rmtree) has had `settle_seconds` to end."""
  reader = formats.reader(config.input.path, config.input.format)
  for wait in (0, settle_seconds):
    stopping.sleep(wait)
    try:
      committed = set(reader.select_steps(config.input.path, 'all', lambda s: False))
    except SurgeryError:  # The input is gone altogether.
      return list(steps)
    gone = [s for s in steps if s not in committed]
    if gone:
      return gone
  return []


def convert(config, step, barrier_timeout_seconds: int, named: bool) -> dict | None:
  """One input step converted and committed; `named`: errors say which step."""
  stopping.check()
  if named and jax.process_index() == 0:
    logging.info('Converting input step %s.', step)
  try:
    return _convert(config, step, barrier_timeout_seconds)
  except SurgeryError as e:
    raise e.within(f'input step {step}') if named else e


def _convert(config, step, barrier_timeout_seconds: int) -> dict | None:
  """Runs the surgery on one input step: its report, or None for a dry run."""

  def barrier(name):
    distributed.barrier(f'surgery_job:{name}', barrier_timeout_seconds)

  phases = Phases()

  with phases('read'):
    if inputs_lib.last_n(config.input.step) is not None and not isinstance(step, tuple):
      step = inputs_lib.window(config, step)
    located = inputs_lib.locate(config, step)
    skeleton, metadata = located.primary.skeleton, located.primary.metadata
    try:
      layout = tree.find_layout(list(metadata), config.params_root)
    except ValueError as e:
      raise SurgeryError(f'config: {e}') from None
    run_fingerprint = located.fingerprint(config)
    target = _output(config, located)

  with phases('mesh'):
    mesh = sharding.make_mesh(config.mesh.shape, config.mesh.axes,
                              sharding.saved_mesh_shape(list(metadata.values())), jax.devices())
    if jax.process_index() == 0:
      logging.info('Mesh %s over %d devices, %d processes.', dict(mesh.shape), mesh.size,
                   jax.process_count())

  with phases('plan'):
    inputs = located.abstract_inputs(mesh, layout, config.partition_rules)
    merges, ops = merging.split_ops(transforms.build(config.transforms))
    plan = plan_lib.make_plan(ops, layout, inputs, mesh, config.partition_rules,
                              located.primary.reader.model_config(located.primary.source),
                              _merge_stage(config, located, merges, layout))
    plan = _with_hf_config(plan, config.output)
    if jax.process_index() == 0:
      for note in plan.notes:
        logging.info('%s', note)
    try:
      out_skeleton = tree.with_sequences(skeleton, config.output.sequences, list(plan.outputs))
    except ValueError as e:
      raise SurgeryError(f'config: {e}') from None
    # Leaves the output format cannot hold are refused before anything is written.
    formats.writer(config.output.format).check_outputs(
        {k: plan.abstract_output(k) for k in plan.outputs}, config.output)
    copies = _copies(config, located, plan, out_skeleton, target)

  budget_bytes, default_budget = _budget(config.memory.host_budget_gb)
  # A msgpack input stays in host memory while the groups stream: they share what it leaves.
  held = located.held_bytes()
  programs = programs_lib.Programs(plan)
  streaming_budget = None if budget_bytes is None else budget_bytes - held
  with phases('compile'):
    groups = _groups(plan, streaming_budget, programs, copies)
  if default_budget:
    _check_fits(groups, budget_bytes, default_budget, held)
  if config.dry_run:
    if jax.process_index() == 0:
      print(describe(plan, groups, located, target, copies, streaming_budget))
      note = target and output.dry_run_note(target, run_fingerprint, config.output.overwrite)
      if note:
        logging.warning('Dry run: %s.', note)
    return None

  claim = output.Claim(target, config.output.lock_timeout_seconds)
  # Process 0 holds the output's lock until the end of the step, however the process ends.
  with distributed.before_exit(claim.release) if jax.process_index() == 0 else contextlib.nullcontext():
    try:
      return _claimed(config, claim, located, (skeleton, out_skeleton), inputs,
                      (plan, programs, copies),
                      groups, streaming_budget, phases, run_fingerprint, barrier,
                      barrier_timeout_seconds)
    except (SurgeryError, BadStagedOutput):
      if jax.process_index() == 0 and not stopping.requested.is_set():
        claim.discard()
      raise
    finally:
      if jax.process_index() == 0:
        claim.release()


def _claimed(config, claim: output.Claim, read, skeletons, inputs, planned, groups, budget_bytes,
             phases, run_fingerprint: str, barrier, barrier_timeout_seconds: int) -> dict:
  """The step once its output is claimed: already done, or written, validated and committed.
  `read`: the inputs; `skeletons`: the primary input's tree and the output's; `planned`: the plan,
  its groups' programs and the outputs copied as stored chunks."""
  plan, _, copies = planned
  target = claim.target
  source = read.primary.source
  key = read.resume_key(run_fingerprint) if jax.process_index() == 0 else None
  # Every process writes into the work folder that process 0's lock token names.
  state, work = distributed.agree('claim', lambda: (claim.acquire(
      key, config.output.overwrite, config.output.wait_seconds), claim.lock.token),
      barrier_timeout_seconds)
  if state == 'done':
    if jax.process_index() == 0:
      logging.info('Already done: %s holds this surgery of %s (fingerprint %s).', target,
                   source.item_dir, run_fingerprint[:12])
    if target.step is not None:
      _prune(config, target.root)  # What an earlier run stopped midway.
    report = json.loads((target.unit / report_lib.REPORT).read_text())
    _announce('Already done:', config, target, report)
    return report
  staging = output.Staging(target.unit, work)
  if jax.process_index() == 0 and state == 'start':
    staging.create(key)
  barrier('staged')
  writer = formats.writer(config.output.format).Writer(
      staging.checkpoint, source, barrier, config.output,
      {k: plan.abstract_output(k) for k in plan.outputs}, skeletons[1], plan.model_config)
  resumed = {}
  if state == 'resume':
    written = staging.written_groups()
    reused = distributed.agree('resumed', lambda: _resumed(writer, groups, written),
                               barrier_timeout_seconds)
    resumed = {i: written[groups[i].outputs] for i in reused}
  if jax.process_index() == 0:
    writer.start(state == 'resume')
  barrier('started')
  # Only process 0 holds the lock: it checks before each write that no other run took it over.
  check = claim.check if jax.process_index() == 0 else lambda: None
  cast_errors = {}
  read_ahead = _read_ahead(groups, budget_bytes, resumed)
  with memory.long_lived():
    _write_and_validate(read, inputs, planned, groups, staging, writer,
                        phases, barrier, check, budget_bytes, resumed, read_ahead, cast_errors)
  reused = sorted(resumed)
  report = report_lib.build(config, plan, groups, source, target, phases.seconds, run_fingerprint,
                            reused, cast_errors, sorted(copies), sorted(read_ahead))
  read.add_to_report(report, plan)
  with phases('commit'), stopping.committing():
    if jax.process_index() == 0:
      claim.check()
      report_lib.write(report, staging.checkpoint)
      claim.commit()
      faults.at('renamed')
    barrier('committed')
  if jax.process_index() == 0:
    logging.vlog(1, 'Seconds per phase: %s.', phases.summary())
  if target.step is not None:
    _prune(config, target.root)
  report['seconds'] = phases.seconds
  _announce('Wrote', config, target, report)
  return report


def _announce(what: str, config, target: output.Target, report: dict) -> None:
  """The line that ends each step: what is in the output, where, and its report; printed, not
  logged, so that `--verbosity=-1` keeps it. Each process logs its peak RSS before it, since the
  memory budget holds per process."""
  logging.info('Process %d: peak RSS %.3f GiB.', jax.process_index(), memory.peak_rss() / 2**30)
  if jax.process_index() != 0:
    return
  unit = config.output.path.rstrip('/') + ('' if target.step is None else f'/{target.step}')
  print(f"{what} {unit}: {len(report['leaves'])} leaves, {cli.human(report['bytes_written'])}, "
        f"validated (report: {unit}/{report_lib.REPORT})", flush=True)


def _prune(config, out_root: paths.Path | None) -> None:
  """Process 0 prunes the output directory to `output.max_to_keep` steps. It runs after commits,
  so a failure is logged, not the run's: the next run prunes again."""
  if jax.process_index() != 0 or not config.output.max_to_keep or config.dry_run or out_root is None:
    return
  try:
    output.prune(out_root, config.output.max_to_keep, config.output.lock_timeout_seconds)
  except Exception as e:  # pylint: disable=broad-except
    logging.warning('Pruning %s to output.max_to_keep=%d stopped: %s: %s', out_root,
                    config.output.max_to_keep, type(e).__name__, e)


def _copies(config, located: inputs_lib.Inputs, plan: plan_lib.Plan, out_skeleton,
            target: output.Target | None) -> dict[str, stored_chunks.Copy]:
  """The outputs copied as their stored chunks: only from one Orbax input into an Orbax output."""
  primary = located.primary
  if not (config.output.copy_stored_chunks and config.output.format == 'orbax'
          and len(located.entries) == 1 and not primary.name
          and primary.reader is formats.module('orbax')):
    return {}
  source = primary.source
  out_trees = sorted({k.partition(tree.SEP)[0] for k in plan.outputs}) if source.items else ['']
  return stored_chunks.plan_copies(source, plan, out_skeleton, out_trees,
                                   target is not None and paths.on_object_store(target.root))


def _groups(plan: plan_lib.Plan, budget_bytes: int | None, programs: programs_lib.Programs,
            copies) -> list[plan_lib.Group]:
  """The groups the outputs stream in. Where they do not fit in one, each takes at most half the
  budget: the next group is then read while this one is written (`_read_ahead`). Whether
  they fit is asked of the arrays alone, which compiles nothing."""
  if (budget_bytes is not None and _reads_ahead()
      and len(plan.groups(budget_bytes, copied=copies)) > 1):
    budget_bytes //= 2
  groups = plan.groups(budget_bytes, programs.temp_bytes, copies)
  programs.keep_only(groups)
  return groups


def _reads_ahead() -> bool:
  """Whether a group may be read while another is written: in one process only. Orbax's save and
  restore each run collectives across the processes, which must come in the same order on all of
  them; run at once, they pair up wrongly."""
  return jax.process_count() == 1


def _read_ahead(groups, budget_bytes: int | None, resumed=()) -> set[int]:
  return plan_lib.read_ahead(groups, budget_bytes, resumed) if _reads_ahead() else set()


def _budget(host_budget_gb: float | None) -> tuple[int | None, str]:
  """(bytes of arrays a group may hold per process, or None for no budget; how the default budget
  was found, '' for the user's)."""
  if host_budget_gb is not None:
    return int(host_budget_gb * 1e9) or None, ''
  budget, how = memory.default_budget(distributed.processes_on_this_host())
  if jax.process_index() == 0:
    logging.info('Memory budget: %.3f GB of arrays per group (%s).', budget / 1e9, how)
  return budget, how


def _check_fits(groups, budget: int, how: str, held: int) -> None:
  """Under the default budget, a group larger than it (with the `held` bytes of a msgpack input
  beside it) is refused before any data moves."""
  largest = max(groups, key=lambda group: group.peak_bytes)
  if largest.peak_bytes + held > budget:
    raise SurgeryError(
        f'not enough memory: {len(largest.outputs)} leaves read together '
        f'({", ".join(largest.outputs[:3])}{" ..." if len(largest.outputs) > 3 else ""}) need '
        f'{largest.peak_bytes / 1e9:.3f} GB of arrays per process'
        + (f' beside the {held / 1e9:.3f} GB of the msgpack input held in memory' if held else '')
        + ', over the memory budget of '
        f'{budget / 1e9:.3f} GB ({how}); give the job more memory or devices, or set '
        'memory.host_budget_gb')


def _resumed(writer, groups, written: dict) -> list[int]:
  """The groups on record in `written` whose partial saves are all there to go on from (process
  0); everything else staged is deleted, to be written again."""
  finished = writer.resumable_saves()
  reused = [i for i, g in enumerate(groups)
            if g.outputs in written and set(written[g.outputs]['saves']) <= finished]
  writer.keep_only({save for i in reused for save in written[groups[i].outputs]['saves']})
  logging.info('Resuming: %d of %d groups were written by an earlier run (groups %s).',
               len(reused), len(groups), ', '.join(map(str, reused)) or 'none')
  return reused


def _write_and_validate(read: inputs_lib.Inputs, inputs, planned, groups, staging: output.Staging,
                        writer, phases, barrier, check: Callable[[], None], budget_bytes,
                        resumed: dict[int, dict], read_ahead: set[int], cast_errors: dict) -> None:
  """Restores, transforms and writes each group into the staging folder with the output format's
  `writer`, then reads it all back. `read`: the inputs; `planned`: the plan, its groups' compiled
  transforms and the outputs copied as stored chunks (after the groups). Groups in `resumed`
  ({index: its record}, written by an earlier run of this surgery) are taken as they are; those
  in `read_ahead` are restored while the group before them is written. `check()` comes before
  each write. Fills `cast_errors` with what each cast of a computed group lost."""
  plan, programs, copies = planned
  streamed = len(groups) > 1
  read_bytes = [plan.inputs_bytes(group.inputs) for group in groups]
  written_bytes = [sum(plan.outputs[k].nbytes for k in group.outputs) for group in groups]
  reading = {}  # {group index: its restore, started while the group before it is written}
  reader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix='surgery_job_read_ahead')
  with Progress(sum(read_bytes), sum(written_bytes), len(groups)) as progress, \
      _shut_down(reader):
    expected = {}
    for index, group in enumerate(groups):
      if index in resumed:
        expected.update(resumed[index]['digests'])
        progress.skip(read_bytes[index], written_bytes[index])
        continue
      if budget_bytes is not None and group.peak_bytes > budget_bytes and jax.process_index() == 0:
        logging.warning('Group %d: %d leaves read together need %.2f GB, over the budget of %.2f GB; '
                        'handled alone.', index, len(group.outputs), group.peak_bytes / 1e9,
                        budget_bytes / 1e9)
      compiling = validate.compile_ahead({k: plan.abstract_output(k) for k in group.outputs})
      with phases('restore', log=not streamed), progress.phase('restore', index, read_bytes[index]):
        restored = (reading.pop(index).result() if index in reading
                    else read.restore({k: inputs[k] for k in group.inputs}))
      with phases('transform', log=not streamed), progress.phase('transform', index):
        computed, cast_stats = distributed.wait_ready(programs.run(group, restored))
        cast_errors.update(cast_errors_lib.summarize(plan.casts, cast_stats))
      outputs = {k: computed[k] if plan.outputs[k].passthrough is None
                 else restored[plan.outputs[k].passthrough] for k in group.outputs}
      del restored, computed  # Inputs that no output passes through are freed before the write.
      if index + 1 in read_ahead:
        reading[index + 1] = reader.submit(
            read.restore, {k: inputs[k] for k in groups[index + 1].inputs})
      with phases('write', log=not streamed), progress.phase('write', index, written_bytes[index]):
        compiling.join()
        digests = validate.digests(outputs)
        saves = writer.saves() if jax.process_index() == 0 else set()
        check()
        writer.write(outputs)
        barrier(f'group_{index}_written')
        if jax.process_index() == 0:
          check()
          staging.add_group(index, group.outputs, digests, sorted(writer.saves() - saves))
        faults.at('group_written')
      expected.update(digests)
      del outputs
      if index < len(groups) - 1:  # The next group reuses what the last one freed.
        memory.release()
      progress.group_done(index)
    if cast_errors and jax.process_index() == 0:
      logging.info('Cast %s (each leaf: cast_errors in the report, or --verbosity=1).',
                   report_lib.cast_summary(cast_errors))
    if streamed:
      for name in ('restore', 'transform', 'write'):
        if name in phases.seconds:  # Not when every group was resumed.
          phases.log(name, len(groups))
    with phases('finalize'), progress.phase('finalize', None):
      check()
      try:
        written_trees = writer.finish()
      except Exception as e:  # pylint: disable=broad-except
        raise BadStagedOutput(
            f'finalize failed: {checkpoint.read_error(e, staging.checkpoint)}') from None
    checksums = {}
    if copies:
      with phases('copy'):
        check()
        checksums = stored_chunks.copy(copies, read.primary.source, written_trees, barrier,
                                       budget_bytes)
    faults.corrupt_output(staging.checkpoint)
    barrier('written')
    with phases('validate'):
      _validate(writer, written_trees, staging.checkpoint, plan, groups, expected,
                lambda index: progress.phase('validate', index, written_bytes[index]))
      if copies:
        # Each process reads back the stored bytes it copied, none decoded; all hear how many differ.
        bad = stored_chunks.mismatches(copies, written_trees, checksums, budget_bytes)
        found = int(multihost_utils.process_allgather(np.asarray([len(bad)], np.int32)).sum())
        if found:
          raise BadStagedOutput(f'validation failed: {found} leaves copied as stored chunks differ '
                                f'on disk' + (f', first {bad[0]!r}' if bad else ''))


@contextlib.contextmanager
def _shut_down(reader: concurrent.futures.ThreadPoolExecutor):
  """Lets a run that stops go without waiting for a read ahead that nobody will take."""
  try:
    yield
  finally:
    reader.shutdown(wait=False, cancel_futures=True)


def _validate(writer, written_trees, unit_dir: paths.Path, plan: plan_lib.Plan, groups,
              expected: dict, progress_phase) -> None:
  """Reads the written checkpoint back, group by group, with the planned shardings; the digest of
  every leaf must equal the one taken of the computed array. `written_trees`: what
  `writer.finish` returned; `progress_phase(index)`: the progress context of group `index`."""
  bad = []
  for index, group in enumerate(groups):
    try:
      with progress_phase(index):
        written = writer.read_back(written_trees, {k: plan.abstract_output(k) for k in group.outputs})
    except Exception as e:  # pylint: disable=broad-except
      raise BadStagedOutput(f'validation failed: {checkpoint.read_error(e, unit_dir)}') from None
    bad += validate.mismatches({k: expected[k] for k in group.outputs}, validate.digests(written))
    del written
    if index < len(groups) - 1:
      memory.release()
  if bad:
    raise BadStagedOutput(f'validation failed: {len(bad)} leaves differ on disk, first {bad[0]!r}')


def _with_hf_config(plan: plan_lib.Plan, output_config) -> plan_lib.Plan:
  """`plan` with `output.hf_config` set over the config.json its ops leave."""
  overrides = output_config.hf_config.to_dict()
  if not overrides:
    return plan
  if plan.model_config is None:
    raise SurgeryError('config: output.hf_config is set but there is no config.json to set it in: '
                       'no op makes one (llama_to_hf) and the input has none')
  try:
    model_config = hf_config.with_overrides(plan.model_config, overrides)
  except SurgeryError as e:
    raise SurgeryError(f'config: output.{e}') from None
  return dataclasses.replace(plan, model_config=model_config)


def _merge_stage(config, located: inputs_lib.Inputs, merges, layout: tree.Layout):
  """The merge ops' stage of several inputs; None for one input."""
  if len(located.entries) == 1:
    if merges or config.optimizer_from:
      raise SurgeryError(f'{merges[0][0] if merges else "config: optimizer_from"} combines several '
                         "inputs, but the config names one: set inputs, or input.step to 'last:N' "
                         'or a list of steps')
    return None
  if not merges:
    raise SurgeryError(f'config: {len(located.entries)} inputs but no op combines them (one of: '
                       f'{", ".join(inputs_lib.merge_lib.OPS)})')
  return merging.Stage(merges, located.names, located.primary.name, layout, config.optimizer_from)


def _output(config, located: inputs_lib.Inputs) -> output.Target | None:
  """Where the output goes; None for a dry run without output.path. `output.item` makes an input
  without steps give an output step."""
  source = located.primary.source
  stepless = source.step is None and config.output.item is None
  if stepless and config.output.step is not None:
    raise SurgeryError('output.step is set but the input is a single PyTree checkpoint (with '
                       'output.item set too, the output is that step)')
  if source.items and config.output.item is not None:
    raise SurgeryError(f'output.item is {config.output.item!r} but the input step has several '
                       f'items ({", ".join(source.items)}): set input.item to convert one')
  if not config.output.path:
    return None
  out_root = paths.of(config.output.path, 'output.path')
  for entry in located.entries:
    if paths.inside(out_root, entry.source.root):
      raise SurgeryError(f'output.path {out_root} is inside input.path {entry.source.root}')
    if paths.inside(entry.source.root, out_root):
      raise SurgeryError(f'input.path {entry.source.root} is inside output.path {out_root}')
    _refuse_overlap(entry.source, out_root)
  if stepless:
    if config.output.custom_metadata:
      raise SurgeryError('output.custom_metadata is set but the input is a single PyTree '
                         'checkpoint, which has no step to record it in')
    return output.Target(out_root, None)
  if config.output.step is not None:
    return output.Target(out_root, config.output.step)
  return output.Target(out_root, 0 if source.step is None else source.step)


def _refuse_overlap(source: checkpoint.Location, out_root: paths.Path) -> None:
  """Refuses an output that overlaps what the run reads, symlinks resolved: the input step folder
  or an item of it may be a link into the output directory (an overwrite would replace the input),
  or the output may lie inside one."""
  read = {'input step folder': [source.step_dir] if source.step is not None else [],
          'input item': [*source.trees().values(), *(source.step_dir / name for name in source.copied)]}
  for label, places in read.items():
    for place in places:
      if paths.inside(place, out_root):
        raise SurgeryError(f'{label} {_really(place)} is inside output.path {_really(out_root)}; '
                           'the output must not overlap the input')
      if paths.inside(out_root, place):
        raise SurgeryError(f'output.path {_really(out_root)} is inside {label} {_really(place)}; '
                           'the output must not overlap the input')


def _really(path: paths.Path) -> str:
  """`path`, and where it leads when a symlink makes that another place."""
  real = paths.real(path)
  return str(path) if real == str(path) else f'{path} (really {real})'


def describe(plan: plan_lib.Plan, groups, located: inputs_lib.Inputs,
             target: output.Target | None, copies=(), budget_bytes: int | None = None) -> str:
  """The dry run's printout: ops, every output leaf with its spec and sources, and the I/O
  (`budget_bytes`: what the groups stream under)."""
  lines = [f'Surgery plan: {located.primary.source.item_dir} -> ' + (
               'no output.path' if target is None else f'{target.root}'
               + (f' (step {target.step})' if target.step is not None else '')),
           f'Mesh: {dict(plan.mesh.shape)}']
  if len(located.entries) > 1:
    lines += [f'Input {e.name}: {e.source.item_dir}' + (f' (step {e.source.step})' if e.source.step
              is not None else '') for e in located.entries]
    lines.append(f'Each group reads its keys of all {len(located.entries)} inputs together: about '
                 f'{len(located.entries)} times the memory of one group of one input.')
  for label, touched in plan.touched:
    lines.append(f'{label}: {len(touched)} keys: {", ".join(touched[:8])}'
                 f'{" ..." if len(touched) > 8 else ""}')
  lines += [f'Model: {note}' for note in plan.notes]
  if plan.model_config is not None:
    lines.append(f'config.json: {len(plan.model_config)} fields, model_type '
                 f'{plan.model_config.get("model_type")!r}; a safetensors output writes it')
  lines.append(f'Output leaves ({len(plan.outputs)}):')
  for key, leaf in plan.outputs.items():
    how = 'unchanged' if leaf.passthrough == key else f'from {", ".join(leaf.sources) or "nothing"}'
    how += ', copied as stored chunks' if key in copies else ''
    lines.append(f'  {key} {leaf.shape} {leaf.dtype.name} {cli.spec_text(leaf.spec)} {how}')
  lines.append(f'Reads {len(plan.needed)} of {len(plan.inputs)} leaves ({plan.bytes_read} bytes); '
               f'writes {len(plan.outputs)} leaves ({plan.bytes_written} bytes).')
  read_ahead = _read_ahead(groups, budget_bytes)
  lines.append(f'Groups: {len(groups)}; predicted peak of arrays per host: '
               f'{plan_lib.peak_bytes(groups, read_ahead) / 1e9:.3f} GB (plus the runtime).')
  for index, group in enumerate(groups):
    lines.append(f'  group {index}: {len(group.outputs)} outputs from {len(group.inputs)} inputs, '
                 f'{group.peak_bytes / 1e9:.3f} GB'
                 f'{", read while the one before is written" if index in read_ahead else ""}: '
                 f'{", ".join(group.outputs[:4])}{" ..." if len(group.outputs) > 4 else ""}')
  return '\n'.join(lines)
