"""Fuse separate query, key and value projections into one `qkv` projection.

  surgery-job --config=configs/fuse_qkv.py:-1 --config.input.path=IN --config.output.path=OUT

Every `X/query/kernel`, `X/key/kernel`, `X/value/kernel` triple becomes `X/qkv/kernel`, joined along
the argument's axis (default -1, the output features); biases likewise where present. Moments
are joined the same way. The fused kernel keeps the spec of the query kernel.
"""

from surgery_job.config import get_default_config


def get_config(axis: str = '-1'):
  config = get_default_config()
  config.transforms = [
      dict(op='concat', sources=[rf'(.*)/{p}/kernel' for p in ('query', 'key', 'value')],
           axis=int(axis), target=r'\1/qkv/kernel'),
      dict(op='concat', sources=[rf'(.*)/{p}/bias' for p in ('query', 'key', 'value')],
           axis=int(axis), target=r'\1/qkv/bias', allow_empty=True),
  ]
  return config
