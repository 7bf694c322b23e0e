"""Thin script: the benchmark lives in bigmachine.bench.streams (python -m bigmachine bench streams)."""
import os
import sys

# This checkout, after PYTHONPATH and installed packages: put another tree first to measure it.
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bigmachine.bench.streams import main  # noqa: E402

if __name__ == "__main__":
    main()
