"""A grading worker process: ``python -m stagewise_pl.verify.worker FD NAME KWARGS_JSON MEMORY_MB``.

Started by :class:`stagewise_pl.verify.pool.GradingPool`; not meant to be run by hand.
"""
import json
import sys

from stagewise_pl.verify.pool import worker_main

if __name__ == "__main__":
    worker_main(int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4]))
