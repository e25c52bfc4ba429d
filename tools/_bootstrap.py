"""Make ``megatron_ddk`` importable when a tool runs as ``python tools/x.py`` from a source checkout."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
