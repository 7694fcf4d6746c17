"""The one exception type that means "bad config or input": exit 2, one line, no traceback."""

import logging
import re
import sys


class SurgeryError(Exception):
  """A problem with the config or the checkpoint that the user must fix."""

  def __init__(self, message: str):
    # Printed as one `surgery-job: error:` line, whatever text (a user's exception) it quotes.
    super().__init__(' '.join(line.strip() for line in str(message).splitlines() if line.strip()))

  def within(self, context: str) -> 'SurgeryError':
    """Returns the same error with `context` (an op, a rule) in front."""
    return SurgeryError(f'{context}: {self}')


def ignore_reads_after_a_failed_restore() -> None:
  """After Orbax aborts a read of a damaged checkpoint, tensorstore still completes the other reads
  into Orbax's closed event loop, and the sibling reads that failed too are never awaited; Python
  reports each (as unraisable, or as asyncio's "Task exception was never retrieved"), around the
  one-line error. They say nothing new. The job and the tools call this first."""
  default_hook = sys.unraisablehook
  if getattr(default_hook, 'ignores_closed_loop', False):
    return
  logging.getLogger('asyncio').addFilter(_not_a_sibling_read_error)

  def hook(unraisable):
    if not (isinstance(unraisable.exc_value, RuntimeError)
            and str(unraisable.exc_value) == 'Event loop is closed'):
      default_hook(unraisable)
  hook.ignores_closed_loop = True  # type: ignore[attr-defined]  # A mark on the function.
  sys.unraisablehook = hook


_TENSORSTORE_STATUS = re.compile(r'[A-Z][A-Z_]+: ')


def _not_a_sibling_read_error(record: logging.LogRecord) -> bool:
  """False for asyncio's report of a tensorstore read error that nobody awaited."""
  error = record.exc_info[1] if record.exc_info else None
  return not (record.getMessage().startswith('Task exception was never retrieved')
              and isinstance(error, ValueError) and _TENSORSTORE_STATUS.match(str(error)))
