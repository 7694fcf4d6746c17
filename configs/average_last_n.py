"""Average the last N committed steps of a training run into one checkpoint, numbered as the newest.

  surgery-job --config=configs/average_last_n.py:5 \
      --config.input.path=RUN --config.output.path=OUT

The argument is N. Every parameter is the mean of its N values; the other leaves (`step`) come
from the newest step; the optimizer state is dropped. Each group reads its leaves of all N steps
together: about N times one group of one checkpoint in memory, never N checkpoints. Beside a live
run, add `--config.watch.enabled=True`: each new committed step S with N steps up to it becomes
output step S, the average of the N newest steps up to S.
"""

from surgery_job.config import get_default_config


def get_config(steps: str = '5'):
  config = get_default_config()
  config.input.step = f'last:{int(steps)}'
  config.transforms = [dict(op='average')]
  return config
