"""Build the Cython extensions. Everything else lives in pyproject.toml.

Compiled are the .pyx modules and the .py modules that have a .pxd beside
them: the connection core and the call path (_rpc, _serialize), written as
plain Python whose classes the .pxd declares as extension types, if it has
any (the .py is then also its pure-Python twin).
"""
import compileall
import glob
import os

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext as _build_ext

SOURCES = sorted(glob.glob("bigmachine/*.pyx")) + sorted(
    path[:-4] + ".py" for path in glob.glob("bigmachine/*.pxd") if os.path.exists(path[:-4] + ".py"))
# annotation_typing off: a compiled .py behaves as Python does, whatever its hints say.
DIRECTIVES = {"language_level": "3", "embedsignature": True, "annotation_typing": False}


class build_ext(_build_ext):
    """Cythonize at build time so a checkout without generated .c files builds."""

    def finalize_options(self):
        from Cython.Build import cythonize  # imported here: a build requirement only

        self.distribution.ext_modules[:] = cythonize(
            self.distribution.ext_modules,
            compiler_directives=DIRECTIVES,
            annotate=bool(os.environ.get("BIGMACHINE_CYTHON_ANNOTATE")),
            force=bool(os.environ.get("BIGMACHINE_CYTHON_ALWAYS")),
        )
        super().finalize_options()

    def run(self):
        super().run()
        if self.inplace:
            # A source checkout: cache the bytecode an installed package has (pip compiles
            # it at install), even where PYTHONDONTWRITEBYTECODE is set. Every session's
            # template imports bigmachine's machine side; compiling it there cost a third
            # of a first start.
            compileall.compile_dir("bigmachine", quiet=1)


setup(
    ext_modules=[
        Extension(os.path.splitext(path)[0].replace("/", "."), [path], extra_compile_args=["-O2"])
        for path in SOURCES
    ],
    cmdclass={"build_ext": build_ext},
)
