"""A model soup: the uniform average of fine-tunes of one base (weights: `transforms[0].weights`).

  surgery-job --config=configs/soup.py:3 --config.inputs.ft0.path=FT0 \
      --config.inputs.ft1.path=FT1 --config.inputs.ft2.path=FT2 --config.output.path=OUT

The argument is the number of fine-tunes, named ft0, ft1, ...; each takes `path` and, for a
CheckpointManager directory, `step` (default: its latest). Leaves other than the params come from
ft0 (the first name); the optimizer state is dropped.
"""

from surgery_job.config import get_default_config, named_input


def get_config(fine_tunes: str = '2'):
  config = get_default_config()
  config.inputs = {f'ft{i}': named_input() for i in range(int(fine_tunes))}
  config.transforms = [dict(op='average')]
  return config
