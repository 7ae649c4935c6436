"""Regenerates the section 7 block of docs/RESULTS.md (TracIn, DVEmb, ACC-DVEmb; Adam-IE, ACC-Adam-IE): `python scripts/reproduce_section7.py --help`.

The harness lives in :mod:`hf_accinf.evaluation.paper.section7`; this file is its command-line entry point.
"""

import sys

from hf_accinf.evaluation.paper.section7 import main

if __name__ == "__main__":
    sys.exit(main())
