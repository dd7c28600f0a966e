"""``python -m tests.cli.preempt_runner FLAGS...``: losia-finetune that waits for a signal mid-step.

For the preemption test: inside 0-based step ``$LOSIA_TEST_BLOCK_AT_STEP`` the
real backend's ``train_step`` creates ``$LOSIA_TEST_READY_FILE`` and waits
until the driver has recorded a stop signal (at most two minutes), then runs
the step. The test sends a real SIGTERM from outside once the file exists, so
the signal lands in the middle of a step however slow the machine is.

Under torchrun, ``$LOSIA_TEST_SIGNAL_RANK`` names the one process that waits (the
others go on into the step's collectives); the file holds its pid, so the test can
signal that process alone.
"""

import os
import sys
import time

from losia_cli import main as main_mod
from losia_cli import signals


def _main() -> int:
  block_at = int(os.environ["LOSIA_TEST_BLOCK_AT_STEP"])
  ready = os.environ["LOSIA_TEST_READY_FILE"]
  rank = os.environ.get("LOSIA_TEST_SIGNAL_RANK")
  mine = rank is None or os.environ.get("RANK") == rank
  real = main_mod.make_backend

  def make_backend(cfg, settings):
    backend = real(cfg, settings)
    step = backend.train_step

    def train_step(batch):
      if mine and backend.step == block_at:
        with open(ready + ".tmp", "w", encoding="utf-8") as f:
          f.write(str(os.getpid()))
        os.replace(ready + ".tmp", ready)
        deadline = time.monotonic() + 120
        while not signals.stop_requested() and time.monotonic() < deadline:
          time.sleep(0.02)
      return step(batch)
    backend.train_step = train_step
    return backend

  main_mod.make_backend = make_backend
  return main_mod.main(sys.argv[1:])


if __name__ == "__main__":
  sys.exit(_main())
