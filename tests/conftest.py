import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The pure-torch core is importable on its own (no ComfyUI): put the repo root on the path.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
