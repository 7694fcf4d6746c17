"""The head-aware ops on literal arrays: split and merge heads, the rotary layouts, their specs and
moments, and a MaxText Llama query kernel taken to Hugging Face's q_proj as HF.md's formula does."""

import re

import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from surgery_job import transforms
from surgery_job.errors import SurgeryError
from surgery_job.transforms import Leaf, State


def state(params: dict, specs: dict | None = None) -> State:
  """Params with their specs and an Adam-like `mu` mirror holding params + 1."""
  specs = specs or {}
  return State({k: Leaf(jnp.asarray(v), specs.get(k, P())) for k, v in params.items()},
               {'mu': {k: Leaf(jnp.asarray(v) + 1, P()) for k, v in params.items()}}, {})


def run(ops: list[dict], s: State) -> State:
  return transforms.apply(transforms.build(ops), s)


def halves(x: np.ndarray) -> np.ndarray:
  """Interleaved pairs (2j, 2j+1) of the last axis to halves (j, j + D/2)."""
  return np.concatenate([x[..., 0::2], x[..., 1::2]], -1)


def test_split_then_merge_heads_round_trip_with_specs_and_moments():
  kernel = np.arange(2 * 12, dtype=np.float32).reshape(2, 12)
  split = run([dict(op='split_heads', pattern='q', axis=1, heads=3)], state({'q': kernel}, {'q': P(None, 'model')}))
  np.testing.assert_array_equal(split.params['q'].value, kernel.reshape(2, 3, 4))
  np.testing.assert_array_equal(split.mirrors['mu']['q'].value, kernel.reshape(2, 3, 4) + 1)
  assert split.params['q'].spec == P(None, 'model', None)
  merged = run([dict(op='merge_heads', pattern='q', axis=1)], split)
  np.testing.assert_array_equal(merged.params['q'].value, kernel)
  np.testing.assert_array_equal(merged.mirrors['mu']['q'].value, kernel + 1)
  assert merged.params['q'].spec == P(None, 'model')


def test_merge_heads_keeps_both_axes_shardings_heads_major():
  s = state({'o': np.zeros((4, 2, 8), np.float32)}, {'o': P('data', 'model', None)})
  assert run([dict(op='merge_heads', pattern='o', axis=0)], s).params['o'].spec == P(('data', 'model'), None)
  s = state({'o': np.zeros((4, 2, 8), np.float32)}, {'o': P(None, None, 'model')})
  assert run([dict(op='merge_heads', pattern='o', axis=1)], s).params['o'].spec == P(None, 'model')


def test_rotary_layouts_are_inverse_permutations_of_head_dim():
  x = np.random.default_rng(0).normal(size=(3, 2, 8)).astype(np.float32)
  out = run([dict(op='rotary', pattern='k', to='halves')], state({'k': x}))
  np.testing.assert_array_equal(out.params['k'].value, halves(x))
  np.testing.assert_array_equal(out.mirrors['mu']['k'].value, halves(x + 1))
  back = run([dict(op='rotary', pattern='k', to='interleaved')], out)
  np.testing.assert_array_equal(back.params['k'].value, x)
  middle = run([dict(op='rotary', pattern='k', to='halves', axis=0)], state({'k': x[:2].transpose(2, 0, 1)}))
  np.testing.assert_array_equal(middle.params['k'].value, halves(x[:2]).transpose(2, 0, 1))


def test_a_maxtext_query_kernel_becomes_hf_q_proj():
  # HF.md: q_proj = halves((q * sqrt(D)).astype(q.dtype)).reshape(E, -1).T, per layer, with
  # grouped query heads kept in their order.
  embed, heads, head_dim = 8, 4, 16
  q = np.random.default_rng(1).normal(size=(embed, heads, head_dim)).astype(np.float32)
  out = run([dict(op='scale', pattern='q', factor=float(np.sqrt(head_dim))),
             dict(op='rotary', pattern='q', to='halves'),
             dict(op='merge_heads', pattern='q', axis=1),
             dict(op='transpose', pattern='q', axes=[1, 0])], state({'q': q}))
  expected = halves((q.astype(np.float32) * np.float32(np.sqrt(head_dim))).astype(q.dtype)).reshape(embed, -1).T
  np.testing.assert_array_equal(out.params['q'].value, expected)


@pytest.mark.parametrize('op, message', [
    (dict(op='split_heads', pattern='w', axis=1, heads=5), "axis 1 of 'w' (size 6) does not divide into 5 heads"),
    (dict(op='merge_heads', pattern='w', axis=1), "axis 1 of 'w' is its last: no head_dim axis follows it"),
    (dict(op='rotary', pattern='w', to='halves', axis=0), "rotary of 'w': head_dim axis 0 has odd size 3"),
    (dict(op='rotary', pattern='w', to='rope'), "to must be one of 'interleaved', 'halves', got 'rope'"),
])
def test_head_ops_refuse_shapes_that_do_not_fit(op, message):
  with pytest.raises(SurgeryError, match=re.escape(message)):
    run([op], state({'w': np.zeros((3, 6), np.float32)}))
