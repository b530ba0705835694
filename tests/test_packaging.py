"""`pip install -e .` (what `make setup` runs) keeps working: setuptools reads pyproject.toml without a
deprecation warning. Deprecated forms (e.g. ``license = { text = ... }``) stop building on the date setuptools
announces, so a fresh clone would then fail to install; this test fails first."""

import warnings
from pathlib import Path

from setuptools.config.pyprojecttoml import apply_configuration
from setuptools.dist import Distribution

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_reads_without_deprecations():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dist = apply_configuration(Distribution(), ROOT / "pyproject.toml")
    assert dist.metadata.license_expression == "MIT"
    for name in dist.metadata.license_files:
        assert (ROOT / name).is_file(), f"pyproject.toml names license file {name}, which is missing"
