"""``python -m moe_framework {demo,bench,kg,info}``: see :mod:`moe_framework.cli`."""

import sys

from .cli import main

sys.exit(main())
