"""SIGTERM and SIGINT as a request to stop cleanly: finish the step, checkpoint, exit.

A cluster scheduler preempts a job with SIGTERM and kills it a little later;
a user presses Ctrl-C. Either way the driver should lose nothing, so while a
run is active the first such signal only records itself (:attr:`StopSignals.signum`)
and the driver stops at its next safe point: after the current training step
(then it writes a checkpoint) or between evaluation chunks. A second Ctrl-C
raises ``KeyboardInterrupt`` at once, for a user who does not want to wait.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Optional

HANDLED = (signal.SIGTERM, signal.SIGINT)

_active: Optional["StopSignals"] = None


class Preempted(Exception):
  """The run stopped on a signal; ``main`` prints ``message`` and exits ``128 + signum``."""

  def __init__(self, signum: int, message: str):
    super().__init__(message)
    self.signum, self.message = signum, message

  @property
  def exit_code(self) -> int:
    return 128 + self.signum


def name(signum: int) -> str:
  return signal.Signals(signum).name


class StopSignals:
  """Context manager: installs the handlers (main thread only) and restores the old ones."""

  def __init__(self, announce: bool = True):
    self.signum: Optional[int] = None
    self.announce = announce  # False: torchrun's other processes (rank 0 says it)
    self._old: dict[int, object] = {}

  def _handle(self, signum, frame) -> None:
    del frame
    if self.signum is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # the second Ctrl-C: stop now
    if self.signum is None:
      self.signum = signum
      if not self.announce:
        return
      # os.write, not print: a handler may run in the middle of another print.
      os.write(2, f"\nlosia-finetune: {name(signum)} received; stopping after the current "
                  "step with a checkpoint (Ctrl-C again to stop at once)\n".encode())

  def __enter__(self) -> "StopSignals":
    global _active
    if threading.current_thread() is threading.main_thread():
      for s in HANDLED:
        self._old[s] = signal.signal(s, self._handle)
    _active = self
    return self

  def __exit__(self, *exc) -> None:
    global _active
    for s, old in self._old.items():
      signal.signal(s, old)
    self._old.clear()
    _active = None


def stop_requested() -> bool:
  """Whether the active run has been asked to stop (for tests that wait on it)."""
  return _active is not None and _active.signum is not None
