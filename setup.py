"""Build the optional C kernels (ema_cli/_kernels.c); everything else is in pyproject.toml.

``optional=True``: without a C compiler the install still succeeds and ema-cli runs the same
arithmetic with numpy instead (slower, same bits).
"""

import sys

from setuptools import Extension, setup

# No fused multiply-add: TF rounds the product before the subtraction, and so must we, even
# when CFLAGS ask for a CPU that has FMA.
flags = [] if sys.platform == "win32" else ["-ffp-contract=off"]

setup(
    ext_modules=[
        Extension(
            "ema_cli._kernels", ["ema_cli/_kernels.c"], extra_compile_args=flags, optional=True
        )
    ]
)
