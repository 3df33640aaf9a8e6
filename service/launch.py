#!/usr/bin/env python3
"""The one entry point: `python service/launch.py [train|sweep|prepare|generate|evaluate|bench] ...`.

With no arguments it trains the embedded demo (local Ray, synthetic data, 4x4 -> 32x32, ./runs/).
On a cluster: `ray job submit --working-dir . -- python service/launch.py --config FILE.yaml`.
"""

import os
import sys

# service/ is the source root: running this file puts it on sys.path; make that explicit for -m/other cwd.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from pggan.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
