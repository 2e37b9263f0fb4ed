"""The versions of torch and Megatron-Core that version-bound code was written for.

Code that relies on a dependency's private or version-specific internals (``safe_load``'s
restricted readers, ``parallel/compat.py``, ``torch_compat.py``) states the
versions it was written for and calls :func:`check` before relying on them. The rule is the same
for all of them: Megatron-Core must be the same minor release (its internals change between
minors); torch may be older (setup.py allows back to 2.6, and each user handles the older API it
knows of) but not newer, since a newer release may have changed what the code reaches into.
Either way the error names the code and what to re-check before raising its ``WRITTEN_FOR``.
"""

import sys

SAME_MINOR = ("megatron.core",)  # any other minor refused; other packages: no newer minor


def minor(version: str) -> tuple:
    """``"2.13.0+cpu"`` -> ``(2, 13)``."""
    return tuple(int(x) for x in version.split("+")[0].split(".")[:2])


def installed(name: str) -> str:
    """The version of the imported package ``name`` (``torch`` or ``megatron.core``)."""
    __import__(name)
    return sys.modules[name].__version__


def check(who: str, written_for: dict, checklist: str) -> None:
    """RuntimeError unless every package in ``written_for`` ({name: "major.minor"}) is installed
    in a version the module ``who`` may run with (module docstring); the message ends with
    ``checklist``, what to re-check on upgrade."""
    for name, wanted in written_for.items():
        version = installed(name)
        have, want = minor(version), minor(wanted)
        if have != want if name in SAME_MINOR else have > want:
            raise RuntimeError(f"{who} was written for {name} {wanted}, this is {version}: "
                               f"{checklist}")
