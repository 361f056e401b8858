"""`python -m cli` runs the `metareward` command line."""

import sys

from cli import main

sys.exit(main())
