"""Grow the vocabulary: pad the token embedding, and an untied output head, to a new size.

  surgery-job --config=configs/vocab_resize.py:32128 \
      --config.input.path=IN --config.output.path=OUT

The argument is the new vocabulary size. New embedding rows are the mean of the old rows; new head
columns are zeros; the Adam moments of the new rows are zeros. The patterns follow Flax names
(`.../embedding`, `lm_head/kernel`, `lm_head/bias`); copy this file to match other names.
"""

from surgery_job.config import get_default_config


def get_config(vocab_size: str = '32128'):
  size = int(vocab_size)
  config = get_default_config()
  config.transforms = [
      dict(op='pad', pattern=r'(.*/)?embedding', axis=0, size=size, init='mean'),
      # Untied heads only: a model with tied embeddings has no lm_head.
      dict(op='pad', pattern=r'(.*/)?lm_head/kernel', axis=-1, size=size, allow_empty=True),
      dict(op='pad', pattern=r'(.*/)?lm_head/bias', axis=0, size=size, allow_empty=True),
  ]
  return config
