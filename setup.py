from setuptools import find_packages, setup

setup(
    name="gtpt-kernels",
    version="0.1.0",
    description="Fused Triton kernels for GTPT (Group-based Token Pruning Transformer, ECCV 2024) and a lean GTPT model",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["gtpt_kernels", "gtpt_kernels.*", "gtpt", "gtpt.*"]),
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.4",
        "triton>=3.2; platform_system == 'Linux'",
        "numpy",
        "fvcore",
        "pycocotools",
        "matplotlib",
        "pillow",
        "tqdm",
    ],
    extras_require={"video": ["av"], "test": ["pytest", "pytest-benchmark", "av"]},
    entry_points={"console_scripts": ["gtpt=gtpt.cli:main"]},
    license="MIT",
)
