"""Writes the layered test checkpoint (step 3) from every process of a multi-process JAX job, each
process holding only its own shards of a ('data', 'model') 2x4 mesh of the global devices.

  launch/local.sh 2 -- PATH   (with SURGERY_JOB="python tests/write_checkpoint.py")
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import jax  # pylint: disable=wrong-import-position
from absl import app, flags  # pylint: disable=wrong-import-position
from flax import traverse_util  # pylint: disable=wrong-import-position
from jax.sharding import NamedSharding  # pylint: disable=wrong-import-position

import checkpoints  # pylint: disable=wrong-import-position

flags.DEFINE_string('coordinator_address', None, '')
flags.DEFINE_integer('num_processes', None, '')
flags.DEFINE_integer('process_id', None, '')
FLAGS = flags.FLAGS


def main(argv) -> None:
  jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  mesh = checkpoints.mesh_2x4()
  # Every process computes the same numpy state and keeps only its addressable shards of it.
  flat = checkpoints.flat_numpy(checkpoints.train_state(checkpoints.layered_params()))
  placed = {k: jax.make_array_from_callback(v.shape, NamedSharding(mesh, checkpoints.saved_spec(k)),
                                            lambda index, v=v: v[index]) for k, v in flat.items()}
  nested = traverse_util.unflatten_dict(placed, sep='/')
  state = {'params': nested['params'], 'opt_state': [nested['opt_state']['0'], None], 'step': nested['step']}
  checkpoints.save_manager(os.path.abspath(argv[1]), state, step=3)


if __name__ == '__main__':
  app.run(main)
