"""`python -m benchmarks`: the same as `grym-stream bench`."""

import sys

from benchmarks.bench import main

sys.exit(main())
