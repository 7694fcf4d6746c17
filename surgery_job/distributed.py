"""Joining the cluster, barriers with timeouts, and failing every process when one fails.

A process that fails publishes its exit code and message in the JAX coordination service's
key-value store and exits at once. Every other process runs a watchdog thread that polls that key:
it logs which process failed and exits with the same code, even while its main thread is blocked in
a collective that will never complete. A process that dies without a word (SIGKILL, lost host) is
caught by the coordination service's heartbeat timeout instead.
"""

import atexit
import os
import sys
import threading
import time
from typing import Callable

import jax
import orbax.checkpoint as ocp
from absl import logging

FAILURE_KEY = 'surgery_job/failure'
POLL_SECONDS = 0.5


def initialize(coordinator_address: str | None, num_processes: int | None, process_id: int | None,
               heartbeat_timeout_seconds: int) -> bool:
  """Joins the cluster JAX detects (Slurm, Open MPI, TPU VMs, Kubernetes) or the flags name.

  Returns False, and stays a single process, when there is no cluster and no flag.
  """
  explicit = any(v is not None for v in (coordinator_address, num_processes, process_id))
  try:
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               heartbeat_timeout_seconds=heartbeat_timeout_seconds)
  except ValueError as e:
    if explicit or 'coordinator_address should be defined' not in str(e):
      raise
    return False
  return True


def barrier(name: str, timeout_seconds: int) -> None:
  """Waits for every process, or fails after `timeout_seconds` instead of hanging."""
  if jax.process_count() > 1:
    ocp.multihost.get_barrier_sync_fn()(key=name, timeout_ms=timeout_seconds * 1000)


def fail(code: int, message: str) -> None:
  """Ends this process with `code`; with several processes, tells the others first."""
  if jax.process_count() > 1:
    try:
      ocp.multihost.get_jax_distributed_client().key_value_set(
          FAILURE_KEY, f'{code}|{jax.process_index()}|{message}')
    except Exception:  # pylint: disable=broad-except
      pass  # Another process failed first; its code stands.
    if jax.process_index() == 0:
      time.sleep(3 * POLL_SECONDS)  # The coordination service dies with process 0: let others read.
  _exit(code)


def watch_for_failures(on_failure: Callable[[], None]) -> None:
  """Starts the watchdog that ends this process when another one reports a failure."""
  client = ocp.multihost.get_jax_distributed_client()
  stop = threading.Event()

  def watch():
    while not stop.wait(POLL_SECONDS):
      try:
        value = client.key_value_try_get(FAILURE_KEY)
      except Exception:  # pylint: disable=broad-except
        value = None  # Not set yet.
      if value:
        code, process, message = value.split('|', 2)
        logging.error('Process %s failed (%s); stopping process %d.', process, message,
                      jax.process_index())
        on_failure()
        _exit(int(code))

  watchdog = threading.Thread(target=watch, name='surgery_job_watchdog', daemon=True)
  watchdog.start()

  # Registered after JAX's own exit handler, so it runs first: the watchdog must not be inside a
  # call to the distributed client while JAX shuts that client down.
  @atexit.register
  def stop_watching():
    stop.set()
    watchdog.join()


def _exit(code: int) -> None:
  """Exits at once: no JAX shutdown barrier (other processes may be stuck) and no teardown of
  Orbax's background threads, whose complaints would follow the one-line error."""
  logging.flush()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)  # pylint: disable=protected-access
