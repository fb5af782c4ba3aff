"""`python -m lamina`: the command-line tool."""

import sys

from lamina.cli import main

sys.exit(main())
