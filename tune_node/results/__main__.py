import sys

from tune_node.results.cli import main

sys.exit(main())
