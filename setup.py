"""Build the Cython extensions. Everything else lives in pyproject.toml."""
import compileall
import os

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext as _build_ext

EXTENSIONS = ["bigmachine._wire", "bigmachine._decoder", "bigmachine._buffers", "bigmachine._waiters", "bigmachine._metrics", "bigmachine._sockio"]


class build_ext(_build_ext):
    """Cythonize at build time so a checkout without generated .c files builds."""

    def finalize_options(self):
        from Cython.Build import cythonize  # imported here: a build requirement only

        directives = {"language_level": "3", "embedsignature": True}
        self.distribution.ext_modules[:] = cythonize(
            self.distribution.ext_modules,
            compiler_directives=directives,
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
        Extension(name, [name.replace(".", "/") + ".pyx"], extra_compile_args=["-O2"])
        for name in EXTENSIONS
    ],
    cmdclass={"build_ext": build_ext},
)
