"""Sections of ``benchmarks/RESULTS.md`` that one script generates and others keep.

A section runs from ``<!-- NAME: begin ... -->`` to ``<!-- NAME: end -->``: ``gpu.py``'s
GPU rows, ``jax_compile_time.py``'s compile times, ``torch_fsdp_memory.py``'s FSDP2
figures. Each script replaces only its own (:func:`replace_section`); ``peers.py``,
which rewrites the rest of the file, carries every section over (:data:`SECTION`).
"""

from __future__ import annotations

import os
import re

SECTION = re.compile(r"<!-- (\S+): begin[^>]*-->.*?<!-- \1: end -->", re.S)


def replace_section(path: str, text: str, begin: str, end: str) -> None:
  """Replaces the section ``begin``...``end`` of ``path`` with ``text`` (appends it when
  absent); nothing else in the file changes. Written to a temporary file and renamed."""
  try:
    with open(path, encoding="utf-8") as f:
      old = f.read()
  except FileNotFoundError:
    old = ""
  i, j = old.find(begin), old.find(end)
  if i >= 0 and j > i:
    new = old[:i] + text.rstrip("\n") + old[j + len(end):]
  else:
    new = old + ("\n" if old and not old.endswith("\n") else "") + ("\n" if old else "") + text
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(new)
  os.replace(tmp, path)
