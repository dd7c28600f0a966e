"""Output directory, checkpoints and the exported model, written atomically.

Layout of ``--output-dir``::

    checkpoints/step-000050/     a complete checkpoint: the backend's files +
                                 driver.json (+ subnets.npz for LoSiA)
    checkpoints/.tmp-step-...    a checkpoint being written (never read back)
    model/                       the exported transformers model + tokenizer
    metrics.jsonl, loss.png, subnets.png, summary.json

Every directory is built under a ``.tmp-*`` name and renamed into place only
when complete, so a crash (or a save that raises) never leaves something that
looks like a finished checkpoint; retention deletes old checkpoints only after
the new one is in place.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any, Callable, Optional

CHECKPOINTS = "checkpoints"
DRIVER_FILE = "driver.json"
_NAME = re.compile(r"^step-(\d+)$")
_TMP = re.compile(r"^\.(?:tmp|old)-.*-(\d+)$")


class OutputDirError(ValueError):
  """The output directory cannot be used as asked (exit code 2)."""


def checkpoint_name(step: int) -> str:
  return f"step-{step:06d}"


def _fsync_dir(path: str) -> None:
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass  # some filesystems cannot sync directories; the rename is still atomic
  finally:
    os.close(fd)


def write_json_atomic(path: str, obj: Any) -> None:
  """Writes JSON via a temporary file and ``os.replace``: readers see old or new, never half."""
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(obj, f, indent=2, sort_keys=False, default=_json_default)
      f.write("\n")
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    _remove(tmp)
    raise


def _json_default(x: Any) -> Any:
  if hasattr(x, "tolist"):
    return x.tolist()
  if isinstance(x, (set, frozenset, tuple)):
    return list(x)
  raise TypeError(f"not JSON-serializable: {type(x).__name__}")


def _remove(path: str) -> None:
  if os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path, ignore_errors=True)
  elif os.path.lexists(path):
    try:
      os.remove(path)
    except OSError:
      pass


def _pid_alive(pid: int) -> bool:
  if pid == os.getpid():
    return True
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except OSError:
    return True  # exists but is not ours
  return True


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
  """Complete checkpoints ``[(step, path)]``, oldest first; temporary directories are ignored."""
  root = os.path.join(output_dir, CHECKPOINTS)
  if not os.path.isdir(root):
    return []
  out = []
  for name in os.listdir(root):
    m = _NAME.match(name)
    path = os.path.join(root, name)
    if m and os.path.isdir(path) and os.path.isfile(os.path.join(path, DRIVER_FILE)):
      out.append((int(m.group(1)), path))
  return sorted(out)


def latest_checkpoint(output_dir: str) -> Optional[tuple[int, str]]:
  ckpts = list_checkpoints(output_dir)
  return ckpts[-1] if ckpts else None


def prepare_output_dir(output_dir: str, resume: bool) -> None:
  """Creates the directory and checks up front that a run can use it.

  Raises:
    OutputDirError: it is a file, cannot be created or written (checked by
      writing a probe file), holds checkpoints but ``resume`` is False, or holds
      none while ``resume`` is True.
  """
  if os.path.exists(output_dir) and not os.path.isdir(output_dir):
    raise OutputDirError(f"--output-dir {output_dir} is a file, not a directory")
  try:
    os.makedirs(output_dir, exist_ok=True)
    probe = os.path.join(output_dir, f".write-probe-{os.getpid()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise OutputDirError(f"--output-dir {output_dir} is not writable: "
                         f"{e.strerror or e}") from None
  found = list_checkpoints(output_dir)
  if found and not resume:
    raise OutputDirError(
        f"--output-dir {output_dir} already holds checkpoints (latest: step {found[-1][0]}); "
        "pass --resume to continue that run, or choose another --output-dir")
  if resume and not found:
    raise OutputDirError(f"--resume: no complete checkpoint in "
                         f"{os.path.join(output_dir, CHECKPOINTS)}")
  clean_stale_temporaries(output_dir)


def clean_stale_temporaries(output_dir: str) -> list[str]:
  """Removes ``.tmp-*``/``.old-*`` leftovers of crashed runs (whose process is gone)."""
  removed = []
  for root in (output_dir, os.path.join(output_dir, CHECKPOINTS)):
    if not os.path.isdir(root):
      continue
    for name in os.listdir(root):
      m = _TMP.match(name)
      if m and not _pid_alive(int(m.group(1))):
        _remove(os.path.join(root, name))
        removed.append(name)
  return removed


def build_dir_atomic(final: str, build: Callable[[str], None], label: str) -> str:
  """Builds ``final`` via ``build(tmp)`` on a temporary sibling, then renames it into place.

  ``build`` receives a path that does not exist yet (the backends' contract).
  If it raises, the temporary directory is removed and an existing ``final``
  is untouched. An existing ``final`` is replaced only after the new one is
  complete: it is moved aside, the new one renamed in, the old one deleted (a
  crash in that instant leaves the old one as ``.old-<label>-<pid>``).
  """
  parent = os.path.dirname(final)
  os.makedirs(parent, exist_ok=True)
  tmp = os.path.join(parent, f".tmp-{label}-{os.getpid()}")
  old = os.path.join(parent, f".old-{label}-{os.getpid()}")
  _remove(tmp)
  try:
    build(tmp)
    if not os.path.isdir(tmp):
      raise RuntimeError(f"writing {label} produced no directory at {tmp}")
    for dirpath, _, files in os.walk(tmp):
      for name in files:
        with open(os.path.join(dirpath, name), "rb") as f:
          os.fsync(f.fileno())
    if os.path.exists(final):
      _remove(old)
      os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(parent)
  except BaseException:
    _remove(tmp)
    raise
  _remove(old)
  return final


def write_checkpoint(output_dir: str, step: int, save_backend: Callable[[str], None],
                     driver_state: dict[str, Any],
                     extra: Optional[Callable[[str], None]] = None) -> str:
  """Writes ``checkpoints/step-NNNNNN`` atomically.

  ``save_backend(tmp)`` creates the directory (``Backend.save_checkpoint``);
  ``extra(tmp)`` may add driver files; ``driver.json`` is written last, so a
  directory without it is never taken for a checkpoint even outside this
  module's renames.
  """
  def build(tmp: str) -> None:
    save_backend(tmp)
    os.makedirs(tmp, exist_ok=True)
    if extra is not None:
      extra(tmp)
    write_json_atomic(os.path.join(tmp, DRIVER_FILE), driver_state)

  final = os.path.join(output_dir, CHECKPOINTS, checkpoint_name(step))
  return build_dir_atomic(final, build, checkpoint_name(step))


def apply_retention(output_dir: str, keep: int) -> list[str]:
  """Deletes all but the ``keep`` newest complete checkpoints; returns the deleted paths."""
  if keep < 1:
    raise ValueError(f"keep must be >= 1; got {keep}")
  ckpts = list_checkpoints(output_dir)
  doomed = [path for _, path in ckpts[:-keep]]
  for path in doomed:
    # Rename first, so a crash mid-delete leaves a temporary, not a damaged checkpoint.
    trash = os.path.join(os.path.dirname(path), f".old-{os.path.basename(path)}-{os.getpid()}")
    os.replace(path, trash)
    _remove(trash)
  return doomed


def read_driver_state(checkpoint_dir: str) -> dict[str, Any]:
  with open(os.path.join(checkpoint_dir, DRIVER_FILE), encoding="utf-8") as f:
    return json.load(f)
