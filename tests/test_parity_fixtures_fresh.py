"""The stored parity fixtures (shared/parity/) are what the generator makes now.

Regenerates them in a temporary directory with scripts/make_parity_fixtures.py
and compares every array exactly (and the files byte for byte), so a change to
the oracle, the shared code or the generator that would make the stored
fixtures stale fails here. Needs NumPy only.
"""

import os

import numpy as np
import pytest

from tests.parity_fixtures import CASES, FIXTURE_DIR, generator


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory):
  out = tmp_path_factory.mktemp("parity")
  assert generator().main(["--out", str(out)]) == 0
  return out


@pytest.mark.parametrize("case", CASES)
def test_stored_fixture_is_fresh(case, regenerated):
  gen = generator()
  stored_path = os.path.join(FIXTURE_DIR, f"{case}.npz")
  fresh_path = os.path.join(regenerated, f"{case}.npz")
  stored_meta, stored = gen.load(stored_path)
  fresh_meta, fresh = gen.load(fresh_path)
  assert stored_meta == fresh_meta
  assert sorted(stored) == sorted(fresh)
  for k in fresh:
    assert stored[k].dtype == fresh[k].dtype and stored[k].shape == fresh[k].shape, k
    np.testing.assert_array_equal(stored[k], fresh[k], err_msg=f"{case}: {k} is stale; rerun "
                                  "scripts/make_parity_fixtures.py")
  with open(stored_path, "rb") as a, open(fresh_path, "rb") as b:
    assert a.read() == b.read(), "same arrays but different bytes (zip metadata?)"


@pytest.mark.parametrize("case", CASES)
def test_fixture_shape_and_size(case):
  gen = generator()
  path = os.path.join(FIXTURE_DIR, f"{case}.npz")
  assert os.path.getsize(path) < 512 * 1024
  meta, a = gen.load(path)
  steps, total, period = meta["steps"], meta["total"], meta["config"]["period"]
  assert steps >= 2 * period * total + 1
  relocs = a["relocalizations"]
  for n in meta["targets"]:
    i = meta["names"].index(n)
    assert (relocs[:, 1] == i).sum() >= 2, f"{n} relocalizes fewer than twice"
    assert a[f"rows/{n}"].shape[0] == steps + 1
  for n in meta["names"]:
    assert a[f"weights/{n}"].dtype == np.float32 and a[f"weights/{n}"].shape[0] == steps + 1
    assert a[f"grads/{n}"].shape[0] == steps
