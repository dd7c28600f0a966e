"""``python -m losia_cli``: the ``losia-finetune`` command."""

import sys

from losia_cli.main import main

if __name__ == "__main__":
  sys.exit(main())
