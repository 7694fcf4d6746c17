"""Ops that combine several inputs into one tree: average, ema, task_arithmetic, slerp, ties, dare.

Each factory returns a `Merge`: which inputs it reads for every leaf its pattern matches, and a pure
function of their values. They run before the other ops (`inputs.py` applies them), each value
computed in float32 (float64 for float64 leaves) and cast back to the leaf's dtype. Formulas are
mergekit's (`mergekit/merge_methods/`, `mergekit/sparsify.py`).
"""

import dataclasses
import math
import re
import zlib
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from surgery_job.errors import SurgeryError

DOT_THRESHOLD = 0.9995  # mergekit's slerp: closer to parallel than this, it interpolates linearly.
NORM_EPS = 1e-8  # mergekit's slerp: vectors shorter than this are not normalized.
RESCALE_EPS = 1e-7  # mergekit's L1 rescale of a sparsified delta: skipped below this norm.


@dataclasses.dataclass(frozen=True)
class Merge:
  """What one merge op reads and computes. `sources` None: every input, in order (oldest step
  first), less `base`. `combine(key, base, sources)` gets float arrays (`base` None when the op has
  none) and returns the merged value."""
  name: str
  pattern: str
  sources: tuple[str, ...] | None
  base: str | None
  combine: Callable[[str, Any, list], Any]
  weights: tuple[float, ...] | None = None  # Checked against the sources once they are known.


def _check_weights(weights, negative_ok: bool = False) -> tuple[float, ...] | None:
  if weights is None:
    return None
  if not isinstance(weights, (list, tuple)) or not all(
      isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights):
    raise SurgeryError(f'weights must be a list of numbers, got {weights!r}')
  for weight in weights:
    if math.isnan(weight) or (weight < 0 and not negative_ok):
      raise SurgeryError(f'weights {list(weights)} hold {weight}: each weight must be a number '
                         f'{"" if negative_ok else "of 0 or more "}(not NaN)')
  return tuple(float(w) for w in weights)


def _check_fraction(name: str, value: float, low_open: bool = False) -> None:
  if math.isnan(value) or not (0 < value <= 1 if low_open else 0 <= value <= 1):
    raise SurgeryError(f'{name} must be in {"(0, 1]" if low_open else "[0, 1]"}, got {value}')


def _sources(sources) -> tuple[str, ...] | None:
  if sources is None:
    return None
  if not isinstance(sources, (list, tuple)) or not all(isinstance(s, str) for s in sources):
    raise SurgeryError(f'sources must be a list of input names, got {sources!r}')
  return tuple(sources)


def _weighted(values: list, weights) -> list:
  return values if weights is None else [w * v for w, v in zip(weights, values)]


def average(sources: Sequence[str] | None = None, weights: Sequence[float] | None = None,
            normalize: bool = True, pattern: str = '.*') -> Merge:
  """The weighted mean of the sources (mergekit's `linear`); weights default to equal."""
  weights = _check_weights(weights)
  if weights is not None and normalize and sum(weights) == 0:
    raise SurgeryError(f'weights {list(weights)} sum to 0: nothing to normalize by')

  def combine(key, base, values):
    del key, base
    total = sum(_weighted(values, weights))
    if not normalize:
      return total
    return total / (len(values) if weights is None else sum(weights))
  return Merge('average', pattern, _sources(sources), None, combine, weights)


def ema(decay: float, sources: Sequence[str] | None = None, pattern: str = '.*') -> Merge:
  """The exponential moving average over the sources, oldest first: from the oldest, each next
  source x makes it decay x it + (1 - decay) x x."""
  _check_fraction('decay', decay)

  def combine(key, base, values):
    del key, base
    average_ = values[0]
    for value in values[1:]:
      average_ = decay * average_ + (1 - decay) * value
    return average_
  return Merge('ema', pattern, _sources(sources), None, combine)


def task_arithmetic(base: str, sources: Sequence[str] | None = None,
                    weights: Sequence[float] | None = None, normalize: bool = False,
                    pattern: str = '.*') -> Merge:
  """base + sum of weight x (source - base); a negative weight subtracts a task."""
  weights = _check_weights(weights, negative_ok=True)

  def combine(key, base_value, values):
    del key
    return _mixed(base_value, [v - base_value for v in values], weights, None, normalize)
  return Merge('task_arithmetic', pattern, _sources(sources), base, combine, weights)


def slerp(a: str, b: str, t: Any, pattern: str = '.*') -> Merge:
  """Spherical interpolation from `a` (t=0) to `b` (t=1), each leaf taken as one vector, linear where
  the two are near-parallel. `t`: a number, or (pattern, t) pairs, the first matching key wins."""
  rules = [('.*', t)] if isinstance(t, (int, float)) and not isinstance(t, bool) else t
  if (not isinstance(rules, (list, tuple)) or not rules
      or not all(isinstance(r, (list, tuple)) and len(r) == 2 and isinstance(r[0], str) for r in rules)):
    raise SurgeryError(f't must be a number or a list of (pattern, t) pairs, got {t!r}')
  for _, value in rules:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise SurgeryError(f't must be a number in [0, 1], got {value!r}')
    _check_fraction('t', value)
  compiled = [(re.compile(p), float(v)) for p, v in rules]

  def t_of(key: str) -> float:
    found = next((v for regex, v in compiled if regex.fullmatch(key)), None)
    if found is None:
      raise SurgeryError(f'no t pattern matches {key!r}')
    return found

  def combine(key, base, values):
    del base
    return interpolate(t_of(key), *values)
  return Merge('slerp', pattern, (a, b), None, combine)


def interpolate(t: float, v0, v1):
  """mergekit's `slerp` of two arrays, each taken as one flat vector."""
  def unit(v):
    norm = jnp.linalg.norm(v.ravel())
    return jnp.where(norm > NORM_EPS, v / jnp.where(norm > NORM_EPS, norm, 1), v)
  dot = jnp.sum(unit(v0) * unit(v1))
  theta_0 = jnp.arccos(jnp.clip(dot, -1, 1))
  sin_theta_0 = jnp.sin(theta_0)
  safe = jnp.where(jnp.abs(dot) > DOT_THRESHOLD, 1, sin_theta_0)
  s0 = jnp.sin(theta_0 - theta_0 * t) / safe
  s1 = jnp.sin(theta_0 * t) / safe
  linear = (1 - t) * v0 + t * v1
  return jnp.where(jnp.abs(dot) > DOT_THRESHOLD, linear, s0 * v0 + s1 * v1)


def ties(base: str, density: float, sources: Sequence[str] | None = None,
         weights: Sequence[float] | None = None, normalize: bool = True,
         pattern: str = '.*') -> Merge:
  """TIES: each task vector keeps its largest `density` share of entries by magnitude, the
  weighted deltas that agree with the sign of their sum are added (divided by their weights'
  sum when `normalize`)."""
  _check_fraction('density', density, low_open=True)
  weights = _check_weights(weights)

  def combine(key, base_value, values):
    del key
    deltas = [magnitude_prune(v - base_value, density) for v in values]
    return _mixed(base_value, deltas, weights, 'sum', normalize)
  return Merge('ties', pattern, _sources(sources), base, combine, weights)


def dare(base: str, density: float, sources: Sequence[str] | None = None,
         weights: Sequence[float] | None = None, seed: int = 0, sign_consensus: bool = False,
         rescale: bool = True, normalize: bool = False, pattern: str = '.*') -> Merge:
  """DARE: each task vector keeps a random `density` share of entries (rescaled to its L1 norm),
  then they are added as task_arithmetic does (`sign_consensus`: as TIES does: mergekit's
  dare_ties). The mask depends on `seed`, the key, the source's place and each entry's index only:
  the same on any mesh and number of processes."""
  _check_fraction('density', density, low_open=True)
  weights = _check_weights(weights)

  def combine(key, base_value, values):
    deltas = [random_prune(v - base_value, density, dare_mask(seed, key, i, v.shape, density), rescale)
              for i, v in enumerate(values)]
    return _mixed(base_value, deltas, weights, 'sum' if sign_consensus else None, normalize)
  return Merge('dare', pattern, _sources(sources), base, combine, weights)


def dare_mask(seed: int, key: str, index: int, shape, density: float):
  """The entries DARE keeps of source `index`'s delta of `key`. Threefry is partitionable (JAX's
  default), so each device draws its own shard's bits and the mask is the same however it is cut."""
  rng = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), zlib.crc32(key.encode())), index)
  # A float32 p: with x64 on, a Python float would draw float64 uniforms, other bits.
  return jax.random.bernoulli(rng, jnp.float32(density), shape)


def magnitude_prune(delta, density: float):
  """mergekit's `magnitude`: the int(density x size) entries of largest magnitude kept, the others
  zero (entries equal to the smallest kept magnitude are kept too)."""
  if density >= 1:
    return delta
  k = int(density * delta.size)
  if k <= 0:
    raise SurgeryError(f'density {density} keeps no entry of a leaf of {delta.size} entries')
  magnitudes = jnp.abs(delta)
  threshold = jnp.sort(magnitudes.ravel())[delta.size - k]
  return jnp.where(magnitudes >= threshold, delta, 0)


def random_prune(delta, density: float, mask, rescale: bool):
  """mergekit's `bernoulli` with the L1 rescale DARE uses."""
  if density >= 1:
    return delta
  masked = jnp.where(mask, delta, 0)
  if not rescale:
    return masked
  before, after = jnp.sum(jnp.abs(delta)), jnp.sum(jnp.abs(masked))
  small = (before < RESCALE_EPS) | (after < RESCALE_EPS)
  return jnp.where(small, masked, masked * (before / jnp.where(small, 1, after)))


def _mixed(base, deltas: list, weights, consensus: str | None, normalize: bool):
  """mergekit's generalized task arithmetic, from the (sparsified) deltas on."""
  weights = jnp.asarray(weights if weights is not None else [1.0] * len(deltas), base.dtype)
  weights = weights.reshape((-1,) + (1,) * base.ndim)
  weighted = jnp.stack(deltas) * weights
  if consensus == 'sum':
    majority = jnp.where(weighted.sum(axis=0) >= 0, 1, -1).astype(base.dtype)
    mask = (jnp.sign(weighted) == majority).astype(base.dtype)
    mixed = (weighted * mask).sum(axis=0)
    divisor = (weights * mask).sum(axis=0)
    divisor = jnp.where(divisor == 0, 1, divisor)
  else:
    mixed = weighted.sum(axis=0)
    divisor = weights.sum(axis=0)
    divisor = jnp.where(jnp.abs(divisor) < 1e-8, 1, divisor)
  if normalize:
    mixed = mixed / divisor
  return base + mixed


OPS = {'average': average, 'ema': ema, 'task_arithmetic': task_arithmetic, 'slerp': slerp,
       'ties': ties, 'dare': dare}
