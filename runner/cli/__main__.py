"""`python -m runner.cli ...`: the `cascade` command (a job submitted to Ray runs it this way)."""

import sys

from runner.cli.main import main

sys.exit(main())
