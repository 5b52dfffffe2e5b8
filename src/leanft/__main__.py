"""``python -m leanft``: the same as the ``leanft`` command (also for ``torchrun -m leanft``)."""

import sys

from leanft.cli import main

sys.exit(main())
