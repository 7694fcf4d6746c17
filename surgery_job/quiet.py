"""What a run shows by default: the job's own lines and every warning. The libraries' INFO lines
(JAX probing for a TPU and joining a cluster, Orbax's every save and restore step, fsspec's
read-ahead caches on gs://) show with `--verbosity=1`."""

import logging as py_logging
import os

from absl import logging

_OWN = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _shown(record: py_logging.LogRecord) -> bool:
  return (record.levelno >= py_logging.WARNING or record.pathname.startswith(_OWN)
          or logging.get_verbosity() >= 1)


def install() -> None:
  """Filters absl's handler, which every Python logger's records reach."""
  logging.get_absl_handler().addFilter(_shown)
