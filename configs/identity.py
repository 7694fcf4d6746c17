"""Identity surgery: restore, re-shard onto the job's mesh, write and validate. Nothing changes.

  surgery-job --config=configs/identity.py --config.input.path=IN --config.output.path=OUT
"""

from surgery_job.config import get_default_config


def get_config():
  return get_default_config()
