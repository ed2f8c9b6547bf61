"""Import path set-up for the benchmark scripts; imported first by each of them.

``python bench/NAME.py`` puts ``bench/`` at the head of ``sys.path``, where ``bench/http.py`` would shadow
the standard library's ``http`` package for every later import (urllib, aiohttp, tornado). This takes
``bench/`` off the path and puts the repository root on it, so the scripts import ``bench._common`` and
``bookshop`` as packages. It must not import anything that imports ``http`` itself.
"""
import os
import sys

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)

sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != BENCH]
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
