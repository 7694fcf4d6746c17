"""Restores a checkpoint item with plain Orbax onto a ROWSxCOLS ('data', 'model') mesh of this
process's devices, using each leaf's saved spec, and writes the arrays to an .npz file.

  python tests/restore_on_mesh.py ITEM_DIR OUT.npz ROWS COLS
"""

import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P


def main(item_dir: str, out: str, rows: int, cols: int) -> None:
  mesh = Mesh(np.asarray(jax.devices()).reshape(rows, cols), ('data', 'model'),
              axis_types=(AxisType.Auto,) * 2)
  checkpointer = ocp.StandardCheckpointer()
  metadata = checkpointer.metadata(item_dir).item_metadata.tree
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=NamedSharding(
      mesh, P(*getattr(m.sharding, 'partition_spec', ())))), metadata)
  restored = checkpointer.restore(item_dir, target)
  leaves = jax.tree_util.tree_flatten_with_path(restored)[0]
  np.savez(out, **{jax.tree_util.keystr(p, simple=True, separator='/'): np.asarray(x) for p, x in leaves})
  print(f'restored {len(leaves)} leaves on {dict(mesh.shape)}')


if __name__ == '__main__':
  main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
