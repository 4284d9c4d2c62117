#!/usr/bin/env python
"""`make chaos`: SIGKILL `attnfd cache build` at random moments, resume, compare bitwise with an
uninterrupted build; prints `N kills, N resumed, 0 corrupt, 0 lost` (harness: attnfd_pipeline/experiments/chaos.py)."""

import sys

from attnfd_pipeline.experiments.chaos import main

if __name__ == "__main__":
    sys.exit(main())
