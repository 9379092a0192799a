"""One-step parity of protoseg's methods with their authors' training code.

``protoseg_side`` runs protoseg's step with every random draw fixed (the one module that
knows protoseg's method internals); ``source_side`` runs the authors' own step code from a
local clone; ``fixtures`` reads and writes what the source computed; the command is
``tools/source_parity.py``.
"""
