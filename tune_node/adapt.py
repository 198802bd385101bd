"""``python -m tune_node.adapt``; the code lives in :mod:`tune_node.experiments.adapt` (this name stays importable)."""

import sys

if __name__ == "__main__":
    # The command line is read before the experiment's module loads torch and Ray: --help answers at once.
    from .cli.options import run_cli

    sys.exit(run_cli("adapt"))

from .experiments import adapt as _moved  # noqa: E402

sys.modules[__name__] = _moved
