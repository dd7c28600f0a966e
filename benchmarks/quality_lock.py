"""One harness process per run directory (``RunLock``), so that two sittings side by side
never train into the same run directory."""

from __future__ import annotations

import os


class RunLock:
  """One harness process per run directory.

  Two invocations (say, a sitting and a side-by-side one with its own ``--json``) may
  plan the same run; the second would resume from the first's checkpoints into the
  same directory and both would write it. The lock file holds the owner's pid; a lock
  whose process is gone (a killed sitting) is taken over.
  """

  def __init__(self, path: str):
    self.path = path

  def __enter__(self) -> "RunLock":
    for _ in range(2):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
      except FileExistsError:
        try:
          with open(self.path, encoding="utf-8") as f:
            pid = int(f.read().strip() or 0)
        except (OSError, ValueError):
          pid = 0
        if pid and alive(pid):
          raise RuntimeError(f"another harness process (pid {pid}) is running this run "
                             f"({self.path}); it is left to that one") from None
        os.remove(self.path)  # stale: its process is gone
        continue
      with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(str(os.getpid()))
      return self
    raise RuntimeError(f"could not take the run lock {self.path}")

  def __exit__(self, *exc) -> None:
    try:
      os.remove(self.path)
    except FileNotFoundError:
      pass


def alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True
