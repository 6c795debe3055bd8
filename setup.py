"""udit-jax: U-DiT and DiT diffusion transformers in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="udit-jax",
    version="0.1.0",
    description="U-shaped Diffusion Transformers (U-DiT) and DiT in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["udit_jax", "udit_jax.*"]),
    install_requires=[
        "jax>=0.6",
        "flax>=0.10",
        "optax>=0.2",
        "orbax-checkpoint>=0.11",
        "tensorflow-datasets>=4.9",
        "grain>=0.2",
        "array-record>=0.5",
        "ml-collections>=0.1.1",
        "numpy>=1.26",
        "absl-py>=2.0",
        "etils[epath]>=1.7",
        "Pillow>=10.0",
        "tqdm>=4.60",
        "safetensors>=0.4",
        "tensorboardX>=2.6",
        "scipy>=1.10",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3.5"],
        # Only for reading official `.pt` checkpoints; never needed at run time otherwise.
        "torch": ["torch>=2.1"],
        # --mode=compile: the TPU compiler (libtpu) for the jax we are tested with; compiles for
        # any TPU topology on a host without TPUs.
        "tpu": ["jax[tpu]==0.10.2"],
    },
)
