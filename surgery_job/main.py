"""Entrypoint: `surgery-job --config=configs/NAME.py --config.input.path=IN --config.output.path=OUT`.

Every process of a multi-host job runs this same command. Exit codes: 0 done, 2 bad config or
input (one line on stderr), 1 failed at run time, 75 stopped by SIGTERM, 130 stopped by Ctrl-C.
"""

import gc
import os
import signal
import sys


def _stopped_while_starting(signum, frame) -> None:
  del frame
  name = signal.Signals(signum).name
  sys.stderr.write(f'surgery-job: stopped by {name} while starting; nothing was written\n')
  os._exit(130 if signum == signal.SIGINT else 75)  # pylint: disable=protected-access


# Importing JAX takes a second or more: a SIGTERM then must not end the process with 143, nor a
# Ctrl-C with a KeyboardInterrupt traceback (SIGINT stays ignored where it is, as under nohup).
signal.signal(signal.SIGTERM, _stopped_while_starting)
if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
  signal.signal(signal.SIGINT, _stopped_while_starting)

# pylint: disable=wrong-import-position
import ast
import json

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from surgery_job import (
  config as config_lib,
  distributed,
  errors,
  job,
  memory,
  quiet,
  stopping,
  usage,
)
from surgery_job.errors import SurgeryError

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2


class _ListLiteral(flags.ArgumentParser):
  """A list field on the command line, which config_flags refuses by itself: a Python or JSON
  literal, `--config.transforms="[{'op': 'drop', 'pattern': 'head/.*'}]"`."""

  def parse(self, argument):
    if not isinstance(argument, str):
      return list(argument)  # The field's value before the override.
    try:
      value = ast.literal_eval(argument)
    except (SyntaxError, ValueError) as python_error:
      try:
        value = json.loads(argument)
      except ValueError:
        reason = getattr(python_error, 'msg', None) or str(python_error)
        raise ValueError(f'a list field takes a Python or JSON literal [...]: {reason}') from None
    if not isinstance(value, list):
      raise ValueError(f'a list field takes a Python or JSON literal [...], got {type(value).__name__}')
    return value

  def flag_type(self) -> str:
    return 'list literal'


config_flags.register_flag_parser_for_type(list, _ListLiteral())
_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Path to a configs/*.py file.', lock_config=False, accept_new_attributes=True)
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'host:port of process 0, where JAX cannot detect the cluster.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes in the job.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process index, 0-based.')
_HEARTBEAT = flags.DEFINE_integer(
    'heartbeat_timeout_seconds', 60, 'A process silent this long is taken for dead; all stop.')
_INIT_TIMEOUT = flags.DEFINE_integer(
    'init_timeout_seconds', 300, 'Longest wait for every process to join the cluster.')
_BARRIER_TIMEOUT = flags.DEFINE_integer(
    'barrier_timeout_seconds', 600, 'Longest wait at a barrier for the other processes.')
_STOP_TIMEOUT = flags.DEFINE_integer(
    'stop_timeout_seconds', 30, 'After SIGTERM, the longest a clean stop may take before exiting.')


def _lay_over_defaults(load_file):
  """Wraps the file loader so overrides (--config.FIELD=...) apply to the file merged with defaults."""
  def parse(path):
    file = path.partition(':')[0]
    if not os.path.isfile(file):
      raise SurgeryError(f'config file {file} does not exist')
    try:
      config = load_file(path)
    except Exception as e:  # pylint: disable=broad-except
      # The config file is Python: it may fail to import or its get_config may raise anything.
      first_line = str(e).strip().splitlines()[0] if str(e).strip() else ''
      raise SurgeryError(f'cannot load config file {path}: {type(e).__name__}: {first_line}') from None
    if not isinstance(config, ml_collections.ConfigDict):
      raise ValueError(f'cannot load a ConfigDict from {path}')
    return config_lib.with_defaults(config)
  return parse


_CONFIG_PARSER = flags.FLAGS['config'].parser
_CONFIG_PARSER.parse = _lay_over_defaults(_CONFIG_PARSER.parse)  # type: ignore[method-assign]


def main(argv) -> None:
  memory.few_arenas()
  # What the imports made lives as long as the process: no garbage collection scans it, until the
  # first step's groups end (`memory.long_lived` freezes it with the plan, then unfreezes all).
  gc.freeze()
  quiet.install()
  errors.ignore_reads_after_a_failed_restore()
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  stopping.install(_STOP_TIMEOUT.value, distributed.fail)
  try:
    joined = distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                    _HEARTBEAT.value, _INIT_TIMEOUT.value)
    if joined:
      distributed.watch_for_failures(_HEARTBEAT.value)
    if jax.process_index() == 0:
      logging.info('surgery_job: %s; %d processes, %d local / %d global %s devices.',
                   'jax.distributed initialised' if joined else 'single process, no cluster',
                   jax.process_count(), jax.local_device_count(), jax.device_count(),
                   jax.devices()[0].platform)
    job.run(_CONFIG.value, barrier_timeout_seconds=_BARRIER_TIMEOUT.value)
    stopping.finish()
    distributed.done()
  except (stopping.Preempted, Exception) as e:  # pylint: disable=broad-except
    if stopping.requested.is_set():
      # Whatever the stop interrupted failed because of it: the input is not at fault.
      logging.warning('Stopped by %s on process %d; %s.', stopping.name(), jax.process_index(),
                      'everything was committed' if stopping.finished.is_set()
                      else 'no output was left half-committed; run it again to finish')
      distributed.fail(stopping.exit_code(), f'stopped by {stopping.name()}')
    elif isinstance(e, SurgeryError):
      print(f'surgery-job: error: {e}', file=sys.stderr)
      distributed.fail(EXIT_BAD_INPUT, str(e))
    else:
      logging.exception('surgery_job failed on process %d', jax.process_index())
      distributed.fail(EXIT_FAILED, f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}')


def _parse_flags(argv):
  """Bad flags or a bad config file end here, before main: one line and exit 2."""
  try:
    remaining = flags.FLAGS(argv)
  except (flags.Error, SurgeryError) as e:
    print(f'surgery-job: error: {str(e).splitlines()[0]}', file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)
  if _CONFIG.value is None:
    print('surgery-job: error: --config=CONFIG.py is required (surgery-job --help shows the fields, '
          'the ops and an example)', file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)
  return remaining


_HELP = ('-h', '-help', '--help', '-?')  # absl's own, which would print only "Try --helpfull".


def run() -> None:
  """The console script."""
  if any(arg in _HELP for arg in sys.argv[1:]):
    job_flags = [(f.name, f.default, f.help) for f in flags.FLAGS.get_key_flags_for_module(sys.modules[__name__])
                 if f.name != 'config']
    print(usage.text(job_flags))
    sys.exit(0)
  app.run(main, flags_parser=_parse_flags)


if __name__ == '__main__':
  run()
