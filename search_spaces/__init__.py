"""The experiment definitions shipped with tune-node, one TOML file per study.

Add an experiment by adding a ``NAME.toml`` file here (then ``--space NAME``), or
pass any file with ``--space path/to/file.toml``. The format is documented in
:mod:`tune_node.search_space`.
"""
