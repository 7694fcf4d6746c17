"""What `surgery-job-inspect`, `surgery-job-diff` and `surgery-job-report` share: argument parsing
that fails in one line with exit 2, a pipe closed early that ends quietly, the checkpoint a path
names, and a config file loaded as the job loads it."""

import argparse
import importlib.util
import math
import os
import sys
from types import ModuleType
from typing import Any, Callable

from surgery_job import checkpoint, config as config_lib, errors, formats, paths
from surgery_job.errors import SurgeryError

EXIT_BAD_INPUT = 2


class Parser(argparse.ArgumentParser):
  """argparse whose errors are one line (`PROG: error: ...`) and exit 2, usable in scripts; its
  description (a module's docstring, with examples) is printed as written."""

  def __init__(self, **kwargs):
    super().__init__(formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)

  def error(self, message):
    self.exit(EXIT_BAD_INPUT, f'{self.prog}: error: {message}\n')


def run(prog: str, main: Callable[[list[str]], int], argv: list[str] | None = None) -> int:
  """Runs `main`; a SurgeryError (bad path, config or checkpoint) is one line and exit 2."""
  errors.ignore_reads_after_a_failed_restore()
  try:
    return main(sys.argv[1:] if argv is None else argv)
  except SurgeryError as e:
    print(f'{prog}: error: {e}', file=sys.stderr)
    return EXIT_BAD_INPUT
  except BrokenPipeError:
    # The reader went away (`... --json | head`): what was printed was all it wanted. Python would
    # complain again flushing stdout at exit, so stdout goes nowhere from here.
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def locate(path: str, step: Any = None,
           input_config=None) -> tuple[ModuleType, checkpoint.Location]:
  """(the format module that reads it, the checkpoint) `path` names: a single PyTree checkpoint, a
  CheckpointManager directory (its `step`, default the latest committed one), one step folder of
  such a directory, a Flax msgpack checkpoint (a `checkpoint_<step>` file or a folder of them), or
  safetensors (a file, a folder of them, or a folder of step folders of them). `input_config`:
  how the job reads inputs (`input.key_separator`); None: the defaults."""
  folder = paths.of(path)
  if not folder.exists():
    raise SurgeryError(f'{folder} does not exist')
  reader = formats.reader(str(folder))
  options = (input_config or config_lib.get_default_config().input).copy_and_resolve_references()
  options.path, options.item = str(folder), None
  if reader is not formats.module('orbax'):
    return reader, reader.locate(options, step)
  if is_step_folder(folder) and step is None:
    return reader, checkpoint.locate(str(folder.parent), checkpoint.step_of(folder.name), None)
  if step is not None and not (folder / '_METADATA').is_file():
    committed = checkpoint.committed_steps(folder)
    if step not in committed:
      raise SurgeryError(f'step {step} is not a committed step of {folder} (committed: {committed})')
  return reader, checkpoint.locate(str(folder), step, None)


def is_step_folder(folder: paths.Path) -> bool:
  """Whether `folder` is one committed step of a CheckpointManager directory."""
  step = checkpoint.step_of(folder.name)
  return (step is not None and checkpoint.TMP_SUFFIX not in folder.name and folder.is_dir()
          and not (folder / '_METADATA').is_file()
          and step in checkpoint.committed_steps(folder.parent))


def load_config(spec: str):
  """`configs/NAME.py[:ARG]` as the job reads it: `get_config(ARG)` laid over the defaults."""
  file, _, arg = spec.partition(':')
  if not paths.of(file).is_file():
    raise SurgeryError(f'config file {file} does not exist')
  module_spec = importlib.util.spec_from_file_location(paths.of(file).stem, file)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
    config = module.get_config(arg) if arg else module.get_config()
  except Exception as e:  # pylint: disable=broad-except  # A user's file: any error is bad input.
    raise SurgeryError(f'cannot load config {spec}: {type(e).__name__}: {e}') from None
  return config_lib.with_defaults(config)


def nbytes(shape, dtype) -> int:
  return math.prod(shape) * dtype.itemsize


def human(size: int) -> str:
  """Bytes in binary units: `512 B`, `1.50 KiB`, `2.00 GiB`."""
  for unit in ('B', 'KiB', 'MiB', 'GiB', 'TiB'):
    if size < 1024 or unit == 'TiB':
      return f'{size} B' if unit == 'B' else f'{size:.2f} {unit}'
    size /= 1024
  raise AssertionError('unreachable')


def spec_text(spec) -> str:
  """A PartitionSpec as written in code, without trailing Nones: `P('model', None)` -> `P('model')`."""
  entries = list(spec)
  while entries and entries[-1] is None:
    entries.pop()
  return 'P(' + ', '.join(repr(tuple(e)) if isinstance(e, (tuple, list)) else repr(e)
                          for e in entries) + ')'
