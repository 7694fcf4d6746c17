"""The one exception type that means "bad config or input": exit 2, one line, no traceback."""


class SurgeryError(Exception):
  """A problem with the config or the checkpoint that the user must fix."""

  def within(self, context: str) -> 'SurgeryError':
    """Returns the same error with `context` (an op, a rule) in front."""
    return SurgeryError(f'{context}: {self}')
