"""``python -m stagewise_pl.experiment``: see :mod:`stagewise_pl.experiment`."""
import os
import sys

from stagewise_pl.experiment import main

if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
