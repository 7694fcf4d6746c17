"""What a cast lost: its statistics on literal arrays, in the report of a real run (bf16, and an
overflow accepted), and a run that fails when finite values would overflow."""

import contextlib
import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from absl import logging

from jobs import ok, surgery
from surgery_job import cast_errors
from surgery_job.plan import CastLeaf
from surgery_job.report import REPORT, summary


def test_statistics_of_a_float16_cast():
  source = np.array([1.0001, 1e6, -7e4, 1e-9, 0.0, 3.0, np.inf, np.nan], np.float32)
  with jax.enable_x64(True):  # As in the job.
    stats = cast_errors.statistics(jnp.asarray(source), jnp.asarray(source).astype(jnp.float16))
  assert {k: np.asarray(v).item() for k, v in stats.items()} == {
      'max_abs_error': pytest.approx(float(np.float32(1.0001) - np.float32(1.0))),
      'max_rel_error': 1.0,  # 1e-9 flushed to zero.
      'overflowed': 2,  # 1e6 and -7e4; inf and NaN were not finite to begin with.
      'flushed_to_zero': 1}


def test_each_cast_leaf_is_logged_at_verbosity_1(caplog):
  casts = (CastLeaf('params/a', 'bfloat16', False, ('params/a',)),)
  stats = {'0': {'max_abs_error': jnp.float32(0.5), 'max_rel_error': jnp.float32(0.25),
                 'overflowed': jnp.int32(0), 'flushed_to_zero': jnp.int32(2)}}
  caplog.set_level(1)
  for verbosity in (0, 1):
    with absl_verbosity(verbosity):
      cast_errors.summarize(casts, stats)
  assert [r.getMessage() for r in caplog.records if r.getMessage().startswith('Cast ')] == [
      'Cast params/a to bfloat16: max abs error 0.5, max rel error 0.25, 0 overflowed, 2 flushed '
      'to zero.']


@contextlib.contextmanager
def absl_verbosity(level: int):
  saved = logging.get_verbosity()
  logging.set_verbosity(level)
  try:
    yield
  finally:
    logging.set_verbosity(saved)


def numpy_statistics(source: np.ndarray, result: np.ndarray) -> dict:
  """The statistics as their definitions say, in numpy float64."""
  before, after = source.astype(np.float64), result.astype(np.float64)
  finite = np.isfinite(before) & np.isfinite(after)
  error = np.where(finite, np.abs(after - before), 0)
  nonzero = finite & (before != 0)
  return {'max_abs_error': np.float32(error.max(initial=0)),
          'max_rel_error': np.float32((error[nonzero] / np.abs(before[nonzero])).max(initial=0)),
          'overflowed': int((np.isfinite(before) & ~np.isfinite(after)).sum()),
          'flushed_to_zero': int(((before != 0) & (after == 0)).sum())}


@pytest.mark.parametrize('shape', [(), (7,), (3, 5), (2, 3, 40)])
def test_statistics_of_any_rank_equal_numpy(shape):
  rng = np.random.default_rng(len(shape))
  source = (rng.standard_normal(shape) * 10.0 ** rng.integers(-30, 8, shape)).astype(np.float32)
  with jax.enable_x64(True):
    stats = cast_errors.statistics(jnp.asarray(source), jnp.asarray(source).astype(jnp.float16))
  expected = numpy_statistics(source, source.astype(np.float16))
  found = {k: np.asarray(v).item() for k, v in stats.items()}
  assert found == {**expected, 'max_abs_error': pytest.approx(expected['max_abs_error']),
                   'max_rel_error': pytest.approx(expected['max_rel_error'])}
  if len(shape) > 1:  # Enough values that some overflow and some flush.
    assert expected['overflowed'] and expected['flushed_to_zero']


def bf16_error(x: np.ndarray) -> tuple[float, float]:
  back = x.astype(ml_dtypes.bfloat16).astype(np.float32)
  nonzero = x != 0
  return float(np.max(np.abs(back - x))), float(np.max(np.abs(back - x)[nonzero] / np.abs(x[nonzero])))


def overflowing(kernel: np.ndarray) -> int:
  """How many values of `kernel` scaled by 1e6 overflow float16."""
  with np.errstate(over='ignore'):
    return int(np.isinf((kernel * np.float32(1e6)).astype(np.float16)).sum())


def test_the_report_gives_what_each_cast_lost(layered, tmp_path):
  in_path, x = layered
  out, result = surgery(tmp_path, in_path, [
      dict(op='scale', pattern='head/kernel', factor=1e6),
      dict(op='cast', pattern='head/kernel', dtype='float16', allow_overflow=True),
      dict(op='cast', pattern=r'layers_\d+/.*', dtype='bfloat16')],
      memory={'host_budget_gb': 0.000005})  # Streamed: each group measures its own casts.
  ok(result)
  report = json.loads((out / '3' / REPORT).read_text())
  assert len(report['groups']) > 3
  errors = report['cast_errors']
  assert sorted(errors) == ['params/head/kernel'] + sorted(
      f'params/layers_{i}/{leaf}' for i in range(3) for leaf in ('attn/qkv/kernel', 'mlp/bias', 'mlp/kernel'))
  for key in errors:
    if key == 'params/head/kernel':
      continue
    max_abs, max_rel = bf16_error(x[key])
    assert errors[key] == {'dtype': 'bfloat16', 'max_abs_error': pytest.approx(max_abs, rel=1e-6),
                           'max_rel_error': pytest.approx(max_rel, rel=1e-6),
                           'overflowed': 0, 'flushed_to_zero': 0}, key
    assert 0 < max_rel <= 2 ** -8
  assert errors['params/head/kernel']['dtype'] == 'float16'
  assert errors['params/head/kernel']['overflowed'] == overflowing(x['params/head/kernel']) > 0
  worst = max(errors, key=lambda k: errors[k]['max_rel_error'])
  # One line for all the casts of every group; each leaf's only with --verbosity=1.
  assert 'Cast params/' not in result.stderr
  assert [line.split('] ', 1)[1] for line in result.stderr.splitlines() if '] Cast ' in line] == [
      f"Cast 10 leaves: worst max rel error {errors[worst]['max_rel_error']:.3g} ({worst}), "
      f"{errors['params/head/kernel']['overflowed']} values overflowed, 0 flushed to zero (each "
      'leaf: cast_errors in the report, or --verbosity=1).']
  assert worst.startswith('params/layers_')  # bfloat16 keeps 8 bits of mantissa, float16 11.
  assert (f"cast 10 leaves: worst max rel error {errors[worst]['max_rel_error']:.3g} ({worst}), "
          f"{errors['params/head/kernel']['overflowed']} values overflowed, 0 flushed to zero"
          ) in summary(report)


def test_a_cast_that_overflows_fails_naming_the_leaf(layered, tmp_path):
  in_path, x = layered
  out, result = surgery(tmp_path, in_path, [
      dict(op='scale', pattern='head/kernel', factor=1e6),
      dict(op='cast', pattern='head/.*', dtype='float16')])
  count = overflowing(x['params/head/kernel'])
  assert result.returncode == 2, result.stderr[-3000:]
  lines = [line for line in result.stderr.splitlines() if line.startswith('surgery-job: error:')]
  assert lines == [f"surgery-job: error: cast of 'params/head/kernel' to float16: {count} finite "
                   'values became inf or NaN; set allow_overflow=True on the op to accept it']
  assert not (out / '3').exists()
