"""Shim for tools that still call `setup.py`: the metadata and the package layout live in pyproject.toml."""

from setuptools import setup

setup()
