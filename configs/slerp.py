"""Spherical interpolation of two models, leaf by leaf (linear where the two are near-parallel).

  surgery-job --config=configs/slerp.py:0.5 --config.inputs.a.path=A \
      --config.inputs.b.path=B --config.output.path=OUT

The argument is t: 0 gives a, 1 gives b. For a t per layer, set `transforms[0].t` to
(pattern, t) pairs, the first pattern matching a parameter's key wins. Leaves other than the
params come from a; the optimizer state is dropped.
"""

from surgery_job.config import get_default_config, named_input


def get_config(t: str = '0.5'):
  config = get_default_config()
  config.inputs = {'a': named_input(), 'b': named_input()}
  config.transforms = [dict(op='slerp', a='a', b='b', t=float(t))]
  return config
