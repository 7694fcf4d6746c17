"""Add a new dense head: a `kernel` (truncated normal, stddev 0.02) and a zero `bias`.

  surgery-job --config=configs/add_head.py:cls_head,768,2 \
      --config.input.path=IN --config.output.path=OUT

The argument is `NAME,IN_FEATURES,OUT_FEATURES`. The head's Adam moments are zeros. New leaves are
replicated unless a partition rule says otherwise, for instance
`config.partition_rules = [(f'{name}/kernel', ('model', None))]` on a mesh with a 'model' axis.
"""

from surgery_job.config import get_default_config


def get_config(head: str = 'head_new,768,2'):
  name, features_in, features_out = head.split(',')
  config = get_default_config()
  config.transforms = [
      dict(op='add', path=f'{name}/kernel', shape=(int(features_in), int(features_out)),
           init='truncated_normal', stddev=0.02, seed=0),
      dict(op='add', path=f'{name}/bias', shape=(int(features_out),), init='zeros'),
  ]
  return config
