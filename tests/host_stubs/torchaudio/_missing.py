"""Test-only stand-in for torchaudio (no wheel exists for torch 2.14). Importable; any use raises."""


class _Missing:
    def __init__(self, name):
        self._name = name

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"torchaudio.{self._name} is a test stand-in: audio is not available on this host")

    def __getattr__(self, attr):
        return _Missing(f"{self._name}.{attr}")

    def __mro_entries__(self, bases):
        return (object,)


def module_getattr(prefix):
    def __getattr__(name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Missing(f"{prefix}{name}")
    return __getattr__
