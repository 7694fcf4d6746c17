"""A flax.optim Adam checkpoint to what a Flax + optax training loop restores.

  surgery-job --config=configs/legacy_flax_optim_to_optax.py \
      --config.input.path=CKPT_DIR_OR_FILE --config.output.path=OUT

The input is the guide's `flax.optim` state dict, as `flax.training.checkpoints` saved it
(`checkpoint_<step>` msgpack files, the latest one unless `input.step` is set): `target/...`,
`state/step` and `state/param_states/<param path>/grad_ema`, `.../grad_sq_ema`. The argument is a
prefix, for an Optimizer saved as a field (`optimizer/`); default none.

The output holds `params` (from `target`), `opt_state` as `optax.adam`'s state (`count` from
`state/step`, `mu` from `grad_ema`, `nu` from `grad_sq_ema`, and optax's EmptyState) and `step`:
it restores with plain Orbax into `{'params': params, 'opt_state':
jax.eval_shape(optax.adam(lr).init, params), 'step': ...}`. flax.optim's Adam and optax's keep the same moments and bias correction, so
training goes on as it would have. Run other surgery on either side of it (moments follow the params
in both layouts), not in the same run: this one moves every leaf out of the params.
"""

from surgery_job.config import get_default_config


def get_config(prefix: str = ''):
  config = get_default_config()
  # Every leaf is addressed by its full key; no moments to carry, they are renamed themselves.
  config.params_root = ''
  config.transforms = [
      dict(op='copy', source=rf'{prefix}state/step', target='opt_state/0/count'),
      dict(op='rename', pattern=rf'{prefix}state/step', replacement='step'),
      dict(op='rename', pattern=rf'{prefix}target/(.*)', replacement=r'params/\1'),
      dict(op='rename', pattern=rf'{prefix}state/param_states/(.*)/grad_ema',
           replacement=r'opt_state/0/mu/\1'),
      dict(op='rename', pattern=rf'{prefix}state/param_states/(.*)/grad_sq_ema',
           replacement=r'opt_state/0/nu/\1'),
  ]
  # optax.adam's state is the tuple (ScaleByAdamState, EmptyState): Orbax's [{...}, None].
  config.output.sequences = [('opt_state', 2)]
  return config
