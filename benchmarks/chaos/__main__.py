"""`python -m benchmarks.chaos`: the same as `grym-stream chaos`."""

import sys

from benchmarks.chaos.run import main

sys.exit(main())
