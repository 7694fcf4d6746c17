"""Own time of `surgery-job-inspect` on a checkpoint of 10,000 leaves: metadata read, tree, print.

  .venv/bin/python bench/inspect_speed.py [--dir=/tmp/surgery_inspect_bench] [--leaves=10000]

Builds (once) a CheckpointManager step of `--leaves` small float32 leaves: 100 layers, each a
params subtree with Adam's mu and nu mirrors. The figure excludes Python start-up and imports.
"""

import argparse
import contextlib
import io
import os
import time
from pathlib import Path

import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp

from surgery_job import inspect


def build(path: Path, leaves: int) -> None:
  count = (leaves - 2) // 3  # Each parameter has Adam's mu and nu; plus the count and the step.
  params = {f'layers_{i // 100}': {} for i in range(count)}
  for i in range(count):
    params[f'layers_{i // 100}'][f'w_{i % 100}'] = jnp.full((4, 8), i, jnp.float32)
  state = {'params': params, 'opt_state': optax.adam(1e-3).init(params), 'step': jnp.int32(0),
           'other': {f'x_{i}': jnp.zeros((2,)) for i in range(leaves - 2 - 3 * count)}}
  with ocp.CheckpointManager(path) as manager:
    manager.save(0, args=ocp.args.Composite(default=ocp.args.StandardSave(state)))


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('--dir', default='/tmp/surgery_inspect_bench')
  parser.add_argument('--leaves', type=int, default=10_000)
  args = parser.parse_args()
  path = Path(args.dir) / f'ckpt_{args.leaves}'
  if not path.exists():
    build(path.absolute(), args.leaves)
  for run in range(3):
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()) as out:
      inspect.main([str(path)])
    seconds = time.perf_counter() - start
    total = out.getvalue().splitlines()[-1]
    print(f'run {run}: {seconds:.3f} s  ({total})')


if __name__ == '__main__':
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  main()
