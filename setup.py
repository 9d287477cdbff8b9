"""Build hook for the optional C speed-up (``coral_torch._planes``); everything else is in
pyproject.toml. ``optional=True``: without a C compiler the install still succeeds and
coral_torch uses its numpy implementation of the same functions (same bytes, slower)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "coral_torch._planes",
            sources=["coral_torch/_planes.c"],
            extra_compile_args=["-O3"],
            optional=True,
        )
    ]
)
