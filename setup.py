"""Build the optional C helper; the package metadata lives in pyproject.toml.

``lossatlas._fastnorms`` computes the Recorder's per-step gradient, weight and update norms on
the CPU in one pass (lossatlas/norms.py). It is optional: without a C compiler the install goes on
and the Recorder uses its pure-PyTorch ring buffer.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("lossatlas._fastnorms", ["lossatlas/_fastnorms.c"],
                             extra_compile_args=["-O3"], optional=True)])
