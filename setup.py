"""gscfast: fast Jacobian chains and gradient scale coefficients for deep networks."""

import shutil
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
KERNEL_FILES = ("**/*.cu", "**/*.cuh", "README.md")
"""What of kernels/ a wheel carries (relative to kernels/)."""
DOCS = ["mkdocs>=1.6", "mkdocstrings-python>=1.10", "mkdocs-material>=9.5"]
"""What builds the documentation site (mkdocs.yml, docs/); the ``docs`` and ``test`` extras."""


class build_py_with_kernels(build_py):
    """Also copy the CUDA sources of the top-level ``kernels/`` (where ``CMakeLists.txt`` builds
    them) into the build tree's ``gscfast/_kernels/``, so a wheel and a regular install contain
    them. An editable install gets no copy and reads ``kernels/`` itself; the lookup is
    ``gscfast/backends/cuda_sources.py``."""

    def _kernel_files(self) -> list[Path]:
        src = HERE / "kernels"
        files = sorted({p for pat in KERNEL_FILES for p in src.glob(pat) if p.is_file()})
        if not any(p.suffix == ".cu" for p in files):
            # a wheel without them would have a CuPy backend that cannot run: refuse instead
            raise FileNotFoundError(
                f"no CUDA sources in {src} (kernels/*.cu): build gscfast from a "
                "full checkout, or an sdist made with its MANIFEST.in"
            )
        return files

    def _kernel_dest(self) -> Path:
        return Path(self.build_lib) / "gscfast" / "_kernels"

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        dest = self._kernel_dest()
        shutil.rmtree(dest, ignore_errors=True)  # no stale file of an earlier build in the wheel
        for p in self._kernel_files():
            out = dest / p.relative_to(HERE / "kernels")
            out.parent.mkdir(parents=True, exist_ok=True)
            self.copy_file(str(p), str(out))

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outs = super().get_outputs(include_bytecode)
        if getattr(self, "editable_mode", False):
            return outs
        dest = self._kernel_dest()
        return outs + [str(dest / p.relative_to(HERE / "kernels")) for p in self._kernel_files()]


setup(
    name="gscfast",
    version="0.1.0",
    description="Fused Jacobian-chain kernels for measuring exploding and vanishing gradients",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["gscfast", "gscfast.*"]),
    package_data={"gscfast": ["py.typed"]},
    install_requires=[
        "numpy>=1.24",
        "torch>=2.3",
        "numba>=0.58",
        "scipy>=1.10",
        "threadpoolctl>=3",
    ],
    extras_require={
        "plot": ["matplotlib>=3.6", "pandas>=1.5", "tqdm>=4.60"],
        "triton": ["triton>=3.0"],
        "cupy": ["cupy-cuda12x>=13"],
        "cupy13": ["cupy-cuda13x>=13"],
        "ray": ["ray>=2.9"],
        "data": ["scikit-learn>=1.2"],
        # the benchmark suite: its JAX peers (CPU) and the BLAS kernels it records
        "bench": ["pytest>=7", "pytest-benchmark>=4", "jax[cpu]>=0.4.30", "threadpoolctl>=3"],
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
            # the benchmark suite's smoke run (tests/test_bench_smoke.py): its JAX peers and the
            # BLAS kernels it records
            "jax[cpu]>=0.4.30",
            "threadpoolctl>=3",
            # static checks (tests/test_static.py)
            "ruff>=0.6",
            "mypy>=1.10",
            # the documentation, built in strict mode by tests/test_docs.py
            *DOCS,
        ],
        "docs": DOCS,
    },
    entry_points={"console_scripts": ["gscfast=gscfast.__main__:main"]},
    cmdclass={"build_py": build_py_with_kernels},
)
