"""Task arithmetic: base + weight x (fine-tune - base), the fine-tune's task vector scaled.

  surgery-job --config=configs/task_vector.py:0.5 --config.inputs.base.path=BASE \
      --config.inputs.ft.path=FT --config.output.path=OUT

The argument is the weight (negative subtracts the task). Leaves other than the params come from
the base; the optimizer state is dropped. For several task vectors, add inputs and list them in
`transforms[0].sources` with one weight each.
"""

from surgery_job.config import get_default_config, named_input


def get_config(weight: str = '1.0'):
  config = get_default_config()
  config.inputs = {'base': named_input(), 'ft': named_input()}
  config.transforms = [dict(op='task_arithmetic', base='base', sources=['ft'],
                            weights=[float(weight)])]
  return config
