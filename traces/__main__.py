"""Entry point for ``python -m traces`` (see traces/cli.py)."""

import sys

from traces.cli import main

sys.exit(main())
