"""The argument parser every jscale command line uses (argparse lives only in :mod:`jscale.cli`)."""

from __future__ import annotations

import argparse


class Parser(argparse.ArgumentParser):
    """argparse, but errors are one line (``jscale train: error: ...``) and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")
