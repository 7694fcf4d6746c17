"""The one exception type that means "bad config or input": exit 2, one line, no traceback."""


class SurgeryError(Exception):
  """A problem with the config or the checkpoint that the user must fix."""

  def __init__(self, message: str):
    # Printed as one `surgery-job: error:` line, whatever text (a user's exception) it quotes.
    super().__init__(' '.join(line.strip() for line in str(message).splitlines() if line.strip()))

  def within(self, context: str) -> 'SurgeryError':
    """Returns the same error with `context` (an op, a rule) in front."""
    return SurgeryError(f'{context}: {self}')
