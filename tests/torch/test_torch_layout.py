"""The layout of ``losia_torch``: no import cycles (function-local imports included), no
module reaching into the optimizer's private attributes, modules of readable size."""

from __future__ import annotations

import ast
import pathlib
import re

import losia_torch

PACKAGE = pathlib.Path(losia_torch.__file__).parent


def _imports() -> dict[str, set[str]]:
  """Module -> the ``losia_torch`` modules it imports anywhere in its body."""
  mods = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
  out = {}
  for m in mods:
    deps = set()
    for node in ast.walk(ast.parse((PACKAGE / f"{m}.py").read_text())):
      if isinstance(node, ast.ImportFrom) and node.module:
        if node.module == "losia_torch":
          deps.update(a.name for a in node.names if a.name in mods)
        elif node.module.startswith("losia_torch."):
          deps.add(node.module.split(".")[1])
      elif isinstance(node, ast.Import):
        deps.update(a.name.split(".")[1] for a in node.names
                    if a.name.startswith("losia_torch."))
    out[m] = deps - {m}
  return out


def test_no_import_cycles():
  graph = _imports()
  done, path = set(), []

  def visit(m):
    if m in path:
      raise AssertionError("import cycle: " + " -> ".join(path[path.index(m):] + [m]))
    if m in done:
      return
    path.append(m)
    for d in sorted(graph[m]):
      visit(d)
    path.pop()
    done.add(m)

  for m in sorted(graph):
    visit(m)
  assert {m for m, deps in graph.items() if "optimizer" in deps} == {"attach", "trainer"}


def test_no_module_uses_the_optimizers_private_attributes():
  private = re.compile(r"\b(?:opt|optimizer)\._[a-z]\w*")
  found = {p.name: private.findall(p.read_text()) for p in PACKAGE.glob("*.py")
           if p.stem != "optimizer"}
  assert {k: v for k, v in found.items() if v} == {}


def test_modules_stay_readable():
  sizes = {p.name: len(p.read_text().splitlines()) for p in PACKAGE.glob("*.py")}
  assert max(sizes.values()) <= 600, sizes


def test_public_names_resolve():
  for name in losia_torch.__all__:
    assert getattr(losia_torch, name) is not None, name
