"""A service that imports a package the SSH tests ship (bmtiny, built by the tests)."""
from __future__ import annotations

import sys

import bigmachine as bm


@bm.service
class Packaged:
    def where(self) -> dict:
        import bmtiny
        import numpy

        return {"version": bmtiny.VERSION, "bmtiny": bmtiny.__file__, "numpy": numpy.__file__,
                "prefix": sys.prefix, "executable": sys.executable}
