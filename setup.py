"""gscfast: fast Jacobian chains and gradient scale coefficients for deep networks."""
from setuptools import find_packages, setup

setup(
    name="gscfast",
    version="0.1.0",
    description="Fused Jacobian-chain kernels for measuring exploding and vanishing gradients",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["gscfast", "gscfast.*"]),
    package_data={"gscfast": ["py.typed"]},
    install_requires=["numpy>=1.24", "torch>=2.3", "numba>=0.58", "scipy>=1.10"],
    extras_require={
        "plot": ["matplotlib>=3.6", "pandas>=1.5", "tqdm>=4.60"],
        "triton": ["triton>=3.0"],
        "cupy": ["cupy-cuda12x>=13"],
        "cupy13": ["cupy-cuda13x>=13"],
        "ray": ["ray>=2.9"],
        "data": ["scikit-learn>=1.2"],
        "test": [
            "pytest>=7",
            "pytest-benchmark>=4",
            "hypothesis>=6",
            "matplotlib>=3.6",
            "pandas>=1.5",
            "tqdm>=4.60",
            "scikit-learn>=1.2",
            "ray>=2.9",
            # GradientFlow's writers are checked against the real TensorBoard and W&B (offline)
            "tensorboard>=2.10",
            "wandb>=0.19",
            # the GPU kernels are checked here without a GPU: triton's interpreter and
            # compiler, cupy's nvcc driver and NVRTC (see tests/gpu)
            "triton>=3.0",
            "cupy-cuda13x>=13",
            "nvidia-cuda-nvrtc>=13",
        ],
    },
    entry_points={"console_scripts": ["gscfast=gscfast.__main__:main"]},
)
