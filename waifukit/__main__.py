"""``python -m waifukit weights list|fetch|verify ...`` (run from the pack folder, ComfyUI/custom_nodes/comfyui-waifu)."""
import sys

from .weights import main

if __name__ == "__main__":
    sys.exit(main())
