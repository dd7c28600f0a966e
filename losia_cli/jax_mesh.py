"""The JAX backend over several local devices (``--devices N``): FSDP-style sharding.

One mesh axis, ``fsdp``, over the first N local devices. Every parameter is split
along its first axis that N divides (small leaves such as norms are replicated),
as ``tests/jax/test_sharding.py`` shards them; every batch is split over the same
axis by rows, so each device computes its rows of the step with the parameter
shards gathered by XLA. The optimizer state is placed by
``losia_jax.state_shardings``: LoSiA's indices, counters and compact block states
replicated, importance buffers like the weight they profile, Adam moments like
their parameters. The jitted step keeps every array where it is
(``in_shardings`` = ``out_shardings``), so a step neither gathers the
parameters onto one device nor moves the state.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from losia_cli.backend import SetupError

AXIS = "fsdp"


def make_mesh(n: int) -> Mesh:
  """A 1-D mesh over the first ``n`` local devices; raises :class:`SetupError` if too few."""
  devices = jax.local_devices()
  if n > len(devices):
    platform = devices[0].platform
    hint = (f"; on a CPU, XLA_FLAGS=--xla_force_host_platform_device_count={n} (set before "
            f"the command) makes XLA split the host into {n} devices" if platform == "cpu"
            else "")
    raise SetupError(f"argument --devices: {n} devices asked, but JAX sees {len(devices)} "
                     f"({platform}): pass at most --devices {len(devices)}{hint}")
  return Mesh(np.array(devices[:n]), (AXIS,))


def leaf_sharding(mesh: Mesh, x: Any) -> NamedSharding:
  """Split along the first axis the mesh size divides; replicated if none does."""
  for ax, d in enumerate(x.shape):
    if d % mesh.size == 0:
      spec = [None] * x.ndim
      spec[ax] = AXIS
      return NamedSharding(mesh, PartitionSpec(*spec))
  return NamedSharding(mesh, PartitionSpec())


def tree_shardings(mesh: Mesh, tree: Any) -> Any:
  return jax.tree.map(lambda x: leaf_sharding(mesh, x), tree)


def batch_sharding(mesh: Mesh, ndim: int, rows_axis: int) -> NamedSharding:
  """Rows (``rows_axis``: 0, or 1 for ``[micro-batch, rows, seq]``) split over the devices."""
  spec = [None] * ndim
  spec[rows_axis] = AXIS
  return NamedSharding(mesh, PartitionSpec(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())
