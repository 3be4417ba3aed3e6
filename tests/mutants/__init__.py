"""Deliberately broken engine adapters, one per real bug class: each must fail a conformance check.

Each module has a docstring naming the bug and where it was seen, and a ``factory()`` returning
a ``ReferenceAdapter`` subclass with the smallest override that reproduces it. Adapter spec:
``mutants.<module>:factory`` (``tests/`` is on ``sys.path`` under pytest).
"""
