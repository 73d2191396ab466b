"""``python -m emu2.train RECIPE ...`` (the entry point for ``accelerate launch -m emu2.train``)."""

import sys

from emu2.train.cli import main

sys.exit(main())
