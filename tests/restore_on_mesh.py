"""Restores a checkpoint item with plain Orbax onto a ROWSxCOLS ('data', 'model') mesh of this
process's devices, using each leaf's saved spec, and writes the arrays to an .npz file.

  python tests/restore_on_mesh.py ITEM_DIR OUT.npz ROWS COLS
"""

import sys

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

import checkpoints


def main(item_dir: str, out: str, rows: int, cols: int) -> None:
  mesh = Mesh(np.asarray(jax.devices()).reshape(rows, cols), ('data', 'model'),
              axis_types=(AxisType.Auto,) * 2)
  leaves = checkpoints.flat_numpy(checkpoints.restore_plain(item_dir, mesh))
  np.savez(out, **leaves)
  print(f'restored {len(leaves)} leaves on {dict(mesh.shape)}')


if __name__ == '__main__':
  main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
