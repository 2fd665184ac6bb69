"""The ``csulora.commands`` entry point: adds ``csulora lab`` to the ``csulora`` command.

The product's CLI calls ``register(subparsers)`` for each entry point of that group; this module
imports nothing heavy, so ``csulora --help`` stays free of torch.
"""

from __future__ import annotations

import argparse

from . import cli


def register(sub: argparse._SubParsersAction) -> None:
    """``csulora lab``; it reads checkpoints module by module (``streams_checkpoints``)."""
    cli.register(sub)
    sub.choices["lab"].set_defaults(streams_checkpoints=True)
