"""Regenerates docs/RESULTS.md (the paper's Tables 1-2, section 6.4 curves, 6.5 cleansing): `python scripts/reproduce_paper.py --help`.

The harness lives in :mod:`hf_accinf.evaluation.paper.reproduce`; this file is its command-line entry point.
"""

import sys

from hf_accinf.evaluation.paper.reproduce import main

if __name__ == "__main__":
    sys.exit(main())
