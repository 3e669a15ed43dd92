"""Test-only stand-in for torchaudio: ComfyUI imports it at start-up; our tests never use audio."""
from ._missing import module_getattr
from . import functional, transforms  # noqa: F401

__version__ = "0.0.0+stand-in"
__getattr__ = module_getattr("")
