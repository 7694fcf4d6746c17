"""The checkpoint formats, one module each, found by name in one table.

Every format module reads: `detect(path)` (whether `input.path` holds this format),
`select_steps(path, step, exported)`, `locate(input_config, step)`, `read_metadata(source)`,
`abstract_inputs(source, metadata, layout, mesh, rules)`, `restore(source, skeleton, targets)`,
`held_bytes(source)` and `model_config(source)` (the Hugging Face config.json beside the tensors,
or None); `RECORDS_SHARDINGS` says whether its files keep each leaf's spec. A
format the job writes also has `check_outputs(abstract_outputs, output_config)`, run before
anything is written, and a `Writer` (`start`, `saves`, `keep_only`, `write`, `finish`,
`read_back`) that `output.py`'s one protocol drives.
"""

import importlib
from types import ModuleType

from surgery_job import paths

# Detection asks them in this order; the last one takes whatever the others do not.
FORMATS = ('flax_msgpack', 'safetensors', 'orbax')
WRITTEN = ('orbax', 'safetensors')


def module(name: str) -> ModuleType:
  return importlib.import_module(f'{__name__}.{name}')


def reader(path: str, input_format: str | None = None) -> ModuleType:
  """The module that reads `input.path`: `input_format`'s, else the first whose `detect` says yes."""
  if input_format is not None:
    return module(input_format)
  for name in FORMATS[:-1]:
    if paths.of(path).exists() and module(name).detect(path):
      return module(name)
  return module(FORMATS[-1])


def writer(output_format: str) -> ModuleType:
  """The module that writes `output.format` (one of `WRITTEN`, as config.py checks)."""
  return module(output_format)
