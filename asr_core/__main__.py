"""``python -m asr_core`` is ``edge-asr`` (kept for scripts written before the entry point moved to edge_asr.py);
the library modules themselves never import the packages above them."""
import sys

from edge_asr import main

sys.exit(main())
