"""Fan-out benchmark: `shoal serve` and N simulated Envoy sidecars over real ADS.

The benchmark is the `fanout` package beside this script (its docstring says
what it measures); this script is its entry point, and every process the
benchmark starts but the server is started from it again. Run as a script,
its folder is first on sys.path, and the package (a folder with an
__init__.py) is found there before this file.

    .venv/bin/python bench/fanout.py [--proxies 100,1000,2000] [--mode delta|sotw]
                                     [--services N] [--json]
"""

import sys

from fanout import command

if __name__ == "__main__":
    sys.exit(command.main())
