"""Package discovery, the one thing pyproject.toml cannot say: setuptools finds every ``ckptcheck*`` package,
plus the check suites, kept at the top level (``suites/``) and installed as ``ckptcheck.suites``."""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["ckptcheck*"]), "ckptcheck.suites"])
