"""Joining the cluster, barriers with timeouts, and failing every process when one fails.

A process that fails publishes its exit code and message in the JAX coordination service's
key-value store and exits at once. Every other process runs a watchdog thread that polls that key:
it logs which process failed and exits with the same code, even while its main thread is blocked in
a collective that will never complete. Each process also bumps a counter of its own there; one whose
counter stops changing (SIGKILL, SIGSTOP, a lost host) for `heartbeat_timeout_seconds` is taken for
dead, and the others exit 1. JAX's own heartbeat and start-up timeouts are set longer than the
job's: JAX ends a process with a C++ abort, the job with its exit code and one line.
"""

import atexit
import contextlib
import functools
import itertools
import json
import os
import socket
import sys
import threading
import time
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
from absl import logging

from surgery_job.errors import SurgeryError

FAILURE_KEY = 'surgery_job/failure'
ALIVE_DIR = 'surgery_job/alive/'
HOSTS_DIR = 'surgery_job/hosts/'
POLL_SECONDS = 0.5
EXIT_FAILED = 1
_before_exit: list[Callable[[], None]] = []
_agreements = itertools.count()


def initialize(coordinator_address: str | None, num_processes: int | None, process_id: int | None,
               heartbeat_timeout_seconds: int, init_timeout_seconds: int) -> bool:
  """Joins the cluster JAX detects (Slurm, Open MPI, TPU VMs, Kubernetes) or the flags name.

  Returns False, and stays a single process, when there is no cluster and no flag. A cluster not
  joined within `init_timeout_seconds` (a process that never started) ends this one with exit 1.
  """
  explicit = any(v is not None for v in (coordinator_address, num_processes, process_id))
  # JAX's preemption service would take SIGTERM for itself; the job handles it (exit 75).
  jax.config.update('jax_enable_preemption_service', False)
  def give_up_joining():
    logging.error('Could not join the cluster in %d s: a process did not start, or cannot reach '
                  'the coordinator.', init_timeout_seconds)
    _exit(EXIT_FAILED)
  give_up = threading.Timer(init_timeout_seconds, give_up_joining)
  give_up.daemon = True
  give_up.start()
  try:
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               initialization_timeout=init_timeout_seconds + 60,
                               heartbeat_timeout_seconds=2 * heartbeat_timeout_seconds + 30)
  except ValueError as e:
    if explicit or 'coordinator_address should be defined' not in str(e):
      raise
    return False
  finally:
    give_up.cancel()
  return True


def barrier(name: str, timeout_seconds: int) -> None:
  """Waits for every process, or fails after `timeout_seconds` instead of hanging."""
  if jax.process_count() > 1:
    ocp.multihost.get_barrier_sync_fn()(key=name, timeout_ms=timeout_seconds * 1000)


def agree(name: str, decide: Callable[[], Any], timeout_seconds: int) -> Any:
  """`decide()` run on process 0 only; its JSON result, or its SurgeryError, on every process."""
  if jax.process_count() == 1:
    return decide()
  client = ocp.multihost.get_jax_distributed_client()
  key = f'surgery_job/agree/{next(_agreements)}/{name}'  # Every process agrees in the same order.
  if jax.process_index() == 0:
    try:
      outcome = {'value': decide()}
    except SurgeryError as e:
      outcome = {'error': str(e)}
    client.key_value_set(key, json.dumps(outcome))
  else:
    outcome = json.loads(client.blocking_key_value_get(key, timeout_seconds * 1000))
  if 'error' in outcome:
    raise SurgeryError(outcome['error'])
  return outcome['value']


def wait_ready(tree: Any) -> Any:
  """`jax.block_until_ready`, but polling: that one holds the GIL while it waits, so a watchdog
  thread could not run while a computation waits for a process that died or hangs."""
  leaves = [jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x
            for x in jax.tree.leaves(tree) if isinstance(x, jax.Array)]
  # The wait starts short and doubles: most programs here (a digest, a small leaf's transform)
  # finish within microseconds, and a fixed 5 ms per wait cost 6 ms a leaf.
  pause = 1e-5
  while not all(x.is_ready() for x in leaves):  # type: ignore[attr-defined]  # Not in its stub.
    time.sleep(pause)
    pause = min(2 * pause, 0.005)
  return tree


@functools.cache
def processes_on_this_host() -> int:
  """How many of the job's processes share this host (and its memory)."""
  if jax.process_count() == 1:
    return 1
  client = ocp.multihost.get_jax_distributed_client()
  host = socket.gethostname()
  client.key_value_set(f'{HOSTS_DIR}{jax.process_index()}', host)
  client.wait_at_barrier('surgery_job:hosts', 600_000)
  return sum(1 for _, name in client.key_value_dir_get(HOSTS_DIR) if name == host)


@contextlib.contextmanager
def before_exit(hook: Callable[[], None]):
  """Within the block, `hook` runs if this process exits through `fail` or the watchdog."""
  _before_exit.append(hook)
  try:
    yield
  finally:
    _before_exit.remove(hook)


def fail(code: int, message: str) -> None:
  """Ends this process with `code`; with several processes, tells the others first."""
  if jax.distributed.is_initialized():
    try:
      ocp.multihost.get_jax_distributed_client().key_value_set(
          FAILURE_KEY, f'{code}|{jax.process_index()}|{message}')
    except Exception:  # pylint: disable=broad-except
      pass  # Another process failed first; its code stands.
    if jax.process_index() == 0:
      time.sleep(3 * POLL_SECONDS)  # The coordination service dies with process 0: let others read.
  if code == EXIT_FAILED and message:
    logging.error('Stopping process %d: %s', jax.process_index(), message)
  _exit(code)


def watch_for_failures(heartbeat_timeout_seconds: int) -> None:
  """Starts the watchdog that ends this process when another one fails or falls silent."""
  client = ocp.multihost.get_jax_distributed_client()
  stop = threading.Event()
  me = jax.process_index()
  last_contact = time.monotonic()

  def watch():
    nonlocal last_contact
    # key -> (a process's last counter, when it changed here); a process that never counts is
    # taken for dead too.
    seen = {f'{ALIVE_DIR}{i}': (None, last_contact) for i in range(jax.process_count())}
    beats = 0
    while not stop.wait(POLL_SECONDS):
      beats += 1
      try:
        client.key_value_set(f'{ALIVE_DIR}{me}', str(beats), allow_overwrite=True)
        counters = dict(client.key_value_dir_get(ALIVE_DIR))
      except Exception:  # pylint: disable=broad-except
        continue  # The coordinator did not answer; `watch_contact` bounds how long that lasts.
      now = last_contact = time.monotonic()
      try:
        failure = client.key_value_try_get(FAILURE_KEY)
      except Exception:  # pylint: disable=broad-except
        failure = None  # Not set.
      if failure:
        code, process, message = failure.split('|', 2)
        logging.error('Process %s failed (%s); stopping process %d.', process, message, me)
        _exit(int(code))
      for key, counter in counters.items():
        if seen.get(key, (None,))[0] != counter:
          seen[key] = (counter, now)
      for key, (_, changed) in seen.items():
        if now - changed > heartbeat_timeout_seconds:
          fail(EXIT_FAILED, f'process {key[len(ALIVE_DIR):]} stopped responding (no heartbeat '
               f'for {heartbeat_timeout_seconds} s)')

  def watch_contact():
    while not stop.wait(POLL_SECONDS):
      if time.monotonic() - last_contact > heartbeat_timeout_seconds:
        logging.error('No answer from the coordinator (process 0) for %d s; stopping process %d.',
                      heartbeat_timeout_seconds, me)
        _exit(EXIT_FAILED)

  watchdog = threading.Thread(target=watch, name='surgery_job_watchdog', daemon=True)
  watchdog.start()
  threading.Thread(target=watch_contact, name='surgery_job_contact', daemon=True).start()

  # Registered after JAX's own exit handler, so it runs first: the watchdog must not be inside a
  # call to the distributed client while JAX shuts that client down.
  @atexit.register
  def stop_watching():
    stop.set()
    watchdog.join()


def done() -> None:
  """Ends a run that succeeded: the exit handlers (the watchdog's, then JAX's shutdown barrier
  with the other processes), but not Python's teardown of every module, where freeing the XLA
  client and joining Orbax's and tensorstore's threads took 0.5 s of a 5 s surgery."""
  atexit._run_exitfuncs()  # pylint: disable=protected-access
  _exit(0)


def _exit(code: int) -> None:
  """Exits at once: no JAX shutdown barrier (other processes may be stuck) and no teardown of
  Orbax's background threads, whose complaints would follow the one-line error."""
  for hook in _before_exit:
    try:
      hook()
    except Exception:  # pylint: disable=broad-except
      logging.exception('While exiting')
  logging.flush()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)  # pylint: disable=protected-access
