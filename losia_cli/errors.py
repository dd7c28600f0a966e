"""The CLI's two exceptions, shared by the parser and the model lookup."""

from __future__ import annotations


class UsageError(Exception):
  """Bad command-line input: printed as ``losia-finetune: error: ...``, exit code 2."""


class HelpExit(Exception):
  """``--help`` was printed; ``main()`` returns ``status``."""

  def __init__(self, status: int = 0):
    super().__init__(status)
    self.status = status
