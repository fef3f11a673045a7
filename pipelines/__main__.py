"""``python -m linear_moe.pipelines``: see :mod:`linear_moe.pipelines.cli`."""
import sys

from linear_moe.pipelines.cli import main

if __name__ == "__main__":
    sys.exit(main())
