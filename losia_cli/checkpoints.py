"""Output directory, checkpoints and the exported model, written atomically.

Layout of ``--output-dir``::

    checkpoints/step-000050/     a complete checkpoint: the backend's files +
                                 driver.json (+ subnets.npz for LoSiA) +
                                 manifest.json (size and sha256 of every file)
    checkpoints/.tmp-step-...    a checkpoint being written (never read back)
    model/                       the exported transformers model + tokenizer
    metrics.jsonl, loss.png, subnets.png, summary.json

Every directory is built under a ``.tmp-*`` name and renamed into place only
when complete, so a crash (or a save that raises) never leaves something that
looks like a finished checkpoint; retention deletes old checkpoints only after
the new one is in place. The manifest, written last, lets a resume tell a
checkpoint that was damaged *afterwards* (a truncated copy, a disk error, an
edit) from a good one: :func:`verify_checkpoint`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from typing import Any, Callable, Optional

CHECKPOINTS = "checkpoints"
DRIVER_FILE = "driver.json"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1
_NAME = re.compile(r"^step-(\d+)$")
_TMP = re.compile(r"^\.(?:tmp|old)-.*-(\d+)$")


class OutputDirError(ValueError):
  """The output directory cannot be used as asked (exit code 2)."""


class CheckpointError(ValueError):
  """A checkpoint cannot be resumed from (exit code 2); the message names it and why."""


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
  """Checkpoints ``[(step, path)]``, oldest first; temporary directories are ignored.

  A ``step-N`` directory counts once it has a driver.json or a manifest (this
  module renames only complete ones into place); whether its files are intact
  is :func:`verify_checkpoint`'s question.
  """
  root = os.path.join(output_dir, CHECKPOINTS)
  if not os.path.isdir(root):
    return []
  out = []
  for name in os.listdir(root):
    m = _NAME.match(name)
    path = os.path.join(root, name)
    if m and os.path.isdir(path) and any(os.path.isfile(os.path.join(path, f))
                                         for f in (DRIVER_FILE, MANIFEST_FILE)):
      out.append((int(m.group(1)), path))
  return sorted(out)


def latest_checkpoint(output_dir: str) -> Optional[tuple[int, str]]:
  ckpts = list_checkpoints(output_dir)
  return ckpts[-1] if ckpts else None


def _probe_writable(directory: str) -> None:
  """Raises ``OSError`` unless a file can be created in ``directory`` (an existing directory).

  A real write, not ``os.access``: that says yes to root on a read-only
  permission bit and knows nothing of quotas or full disks.
  """
  probe = os.path.join(directory, f".write-probe-{os.getpid()}")
  with open(probe, "w") as f:
    f.write("ok")
  os.remove(probe)


def _nearest_existing(path: str) -> str:
  while not os.path.exists(path):
    parent = os.path.dirname(path)
    if parent == path:
      break
    path = parent
  return path


def check_output_dir(output_dir: str, resume: bool) -> None:
  """Checks up front that a run can use ``output_dir``, creating nothing in it.

  Raises:
    OutputDirError: it is a file, cannot be created or written (an existing
      directory and its ``checkpoints/`` are probed by writing a file; a new
      one by checking the nearest existing parent), holds checkpoints but
      ``resume`` is False, or holds none while ``resume`` is True.
  """
  if os.path.exists(output_dir) and not os.path.isdir(output_dir):
    raise OutputDirError(f"--output-dir {output_dir} is a file, not a directory")
  checkpoints = os.path.join(output_dir, CHECKPOINTS)
  try:
    if os.path.isdir(output_dir):
      _probe_writable(output_dir)
      if os.path.isdir(checkpoints):
        try:
          _probe_writable(checkpoints)
        except OSError as e:
          raise OutputDirError(f"{checkpoints} is not writable ({e.strerror or e}); no "
                               "checkpoint could be saved: fix its permissions (chmod u+w) or "
                               "copy the run to a writable --output-dir") from None
    else:
      parent = _nearest_existing(os.path.dirname(output_dir))
      if not os.path.isdir(parent):
        raise OSError(20, "Not a directory", parent)  # e.g. --output-dir FILE/sub
      _probe_writable(parent)
  except OSError as e:
    raise OutputDirError(f"--output-dir {output_dir} is not writable: "
                         f"{e.strerror or e}") from None
  found = list_checkpoints(output_dir)
  if found and not resume:
    raise OutputDirError(
        f"--output-dir {output_dir} already holds checkpoints (latest: step {found[-1][0]}); "
        "pass --resume to continue that run, or choose another --output-dir")
  if resume and not found:
    raise OutputDirError(f"--resume: no complete checkpoint in {checkpoints}")


def create_output_dir(output_dir: str) -> None:
  """Creates the directory (once the inputs are known to be good) and tidies crash leftovers."""
  try:
    os.makedirs(output_dir, exist_ok=True)
  except OSError as e:
    raise OutputDirError(f"--output-dir {output_dir} cannot be created: "
                         f"{e.strerror or e}") from None
  clean_stale_temporaries(output_dir)


def prepare_output_dir(output_dir: str, resume: bool) -> None:
  """:func:`check_output_dir`, then :func:`create_output_dir`."""
  check_output_dir(output_dir, resume)
  create_output_dir(output_dir)


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
  ``extra(tmp)`` may add driver files; ``driver.json`` and then the manifest
  of every file are written last, so a directory without them is never taken
  for a checkpoint even outside this module's renames.
  """
  def build(tmp: str) -> None:
    save_backend(tmp)
    os.makedirs(tmp, exist_ok=True)
    if extra is not None:
      extra(tmp)
    write_json_atomic(os.path.join(tmp, DRIVER_FILE), driver_state)
    write_manifest(tmp)

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


# --- manifest --------------------------------------------------------------------------------

def sha256_file(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def _files_under(directory: str) -> list[str]:
  out = []
  for dirpath, _, files in os.walk(directory):
    for name in files:
      out.append(os.path.relpath(os.path.join(dirpath, name), directory).replace(os.sep, "/"))
  return sorted(out)


def write_manifest(directory: str) -> None:
  """Records size and sha256 of every file in ``directory`` (but itself) in manifest.json."""
  files = {}
  for rel in _files_under(directory):
    if rel == MANIFEST_FILE:
      continue
    path = os.path.join(directory, rel)
    files[rel] = {"bytes": os.path.getsize(path), "sha256": sha256_file(path)}
  write_json_atomic(os.path.join(directory, MANIFEST_FILE),
                    {"format": MANIFEST_FORMAT, "files": files})


def verify_checkpoint(directory: str) -> Optional[str]:
  """None if every file the manifest lists is there with its size and sha256; else what is wrong.

  Files the manifest does not list are ignored (they cannot have been read
  back by anything that wrote the checkpoint). The answer is a short phrase
  for a one-line message, e.g. ``"optimizer.pt is missing"``.
  """
  path = os.path.join(directory, MANIFEST_FILE)
  if not os.path.isfile(path):
    return f"it has no {MANIFEST_FILE} (incomplete, or written by an older losia-finetune)"
  try:
    with open(path, encoding="utf-8") as f:
      manifest = json.load(f)
    files = manifest["files"]
    if manifest.get("format") != MANIFEST_FORMAT or not isinstance(files, dict):
      raise ValueError
    entries = [(rel, int(e["bytes"]), str(e["sha256"])) for rel, e in files.items()]
  except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
    return f"its {MANIFEST_FILE} is unreadable or not a manifest"
  if DRIVER_FILE not in files:
    return f"its {MANIFEST_FILE} does not list {DRIVER_FILE}"
  for rel, size, digest in entries:
    full = os.path.join(directory, *rel.split("/"))
    if not os.path.isfile(full):
      return f"{rel} is missing"
    actual = os.path.getsize(full)
    if actual != size:
      return f"{rel} has {actual} bytes, {size} when saved (truncated or overwritten)"
    try:
      if sha256_file(full) != digest:
        return f"{rel} does not match its checksum (corrupted or edited)"
    except OSError as e:
      return f"{rel} cannot be read ({e.strerror or e})"
  return None
