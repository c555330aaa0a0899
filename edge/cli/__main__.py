"""`python -m edge.cli` runs the command line."""
import sys

from edge.cli.main import main

sys.exit(main())
