"""`python -m benchmarks.scaleout`: the scale-out benchmark (run.py)."""

import sys

from benchmarks.scaleout.run import main

sys.exit(main())
