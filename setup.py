"""Package discovery only (everything else is in pyproject.toml): the Triton kernels in the
top-level ``kernels/`` folder install as ``nbengine.kernels`` — never as a top-level ``kernels``
module, a name Hugging Face's kernel hub owns and transformers probes for."""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["nbengine", "nbengine.*"]) + ["nbengine.kernels"],
    package_dir={"nbengine.kernels": "kernels"},
)
