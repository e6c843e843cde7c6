"""`python -m fungpt ...` is the same as the `fungpt` command (torchrun uses this form)."""

import sys

from fungpt.cli import main

sys.exit(main())
