from ._missing import module_getattr
__getattr__ = module_getattr("functional.")
