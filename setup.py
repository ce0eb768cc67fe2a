"""Packaging for fasttrain.

The import name is ``fasttrain``; the distribution is ``fasttrain-resnet`` (``fasttrain`` is taken on
PyPI). The Triton kernels live in the top-level ``kernels/`` folder of the repository and are
installed as the subpackage ``fasttrain.kernels``: a top-level ``kernels`` module is never installed
(a popular PyPI package owns that name).
"""
from setuptools import setup

setup(
    name="fasttrain-resnet",
    version="0.1.0",
    description="A performance-engineered PyTorch trainer for CIFAR-10 Efficient ResNets",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=["fasttrain", "fasttrain.data", "fasttrain.kernels"],
    package_dir={"fasttrain": "fasttrain", "fasttrain.kernels": "kernels"},
    install_requires=[
        "torch>=2.6",
        "torchvision",
        "numpy",
        "rich",
        "pyyaml",
        "triton; platform_system == 'Linux'",
    ],
    extras_require={
        # our GPU machines run CUDA 13
        "dali": ["nvidia-dali-cuda130"],
        "plot": ["matplotlib"],
        "tensorboard": ["tensorboard"],
        "dev": ["pytest", "hypothesis", "matplotlib", "pillow", "tensorboard"],
    },
    entry_points={"console_scripts": ["fasttrain=fasttrain.cli:main"]},
)
