"""``python -m tune_node.train_one``; the code lives in :mod:`tune_node.cli.train_one` (this name stays importable)."""

import sys

if __name__ == "__main__":
    # The command line is read before torch loads: --help answers at once.
    from .cli.options import run_cli

    sys.exit(run_cli("train_one"))

from .cli import train_one as _moved  # noqa: E402

sys.modules[__name__] = _moved
