"""Loading the cross-framework parity fixtures of ``shared/parity/`` (see its README).

The fixtures are written by ``scripts/make_parity_fixtures.py``; this module
imports that script (it is not a package) so that the tests and the generator
share one reader.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE_DIR = os.path.join(ROOT, "shared", "parity")
SCRIPT = os.path.join(ROOT, "scripts", "make_parity_fixtures.py")


def load_script(name: str, path: str):
  """A Python script that is not a package module, imported as module ``name``."""
  spec = importlib.util.spec_from_file_location(name, path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def generator():
  """The ``make_parity_fixtures`` script as a module."""
  return load_script("make_parity_fixtures", SCRIPT)


CASES = tuple(generator().CASES)


class Fixture:
  """One fixture file: ``meta`` (dict) and accessors by parameter name and step.

  Step ``k`` (0-based) reads ``grad(name, k)`` and leaves ``weights(name, k + 1)``
  and ``rows(name, k + 1)``/``cols(name, k + 1)``; index 0 is the initial state.
  """

  def __init__(self, case: str, directory: str = FIXTURE_DIR):
    self.case = case
    self.meta, self.arrays = generator().load(os.path.join(directory, f"{case}.npz"))
    self.names: list[str] = self.meta["names"]
    self.targets: list[str] = self.meta["targets"]
    self.steps: int = self.meta["steps"]
    self.config_json: str = self.arrays["config_json"].tobytes().decode("utf-8")

  def weights(self, name: str, k: int) -> np.ndarray:
    return self.arrays[f"weights/{name}"][k]

  def grad(self, name: str, k: int) -> np.ndarray:
    return self.arrays[f"grads/{name}"][k].astype(np.float32)

  def rows(self, name: str, k: int) -> np.ndarray:
    return self.arrays[f"rows/{name}"][k]

  def cols(self, name: str, k: int) -> np.ndarray:
    return self.arrays[f"cols/{name}"][k]


def nest(flat: dict) -> dict:
  """``{"a.0.b": x}`` -> ``{"a": {"0": {"b": x}}}`` (JAX path components equal torch names)."""
  out: dict = {}
  for name, v in flat.items():
    d = out
    parts = name.split(".")
    for p in parts[:-1]:
      d = d.setdefault(p, {})
    d[parts[-1]] = v
  return out
