from setuptools import find_packages, setup

# gtpt export / PoseEstimator(runtime=...): ONNX (TorchScript and dynamo exporters) and ONNX Runtime on the CPU.
# The test extra includes them, so CI exercises the exports.
DEPLOY = ["onnx>=1.16", "onnxruntime>=1.18", "onnxscript>=0.3"]

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
    # video: gtpt infer on video files (PyAV, FFmpeg's libraries in the wheel); deploy: see above.
    extras_require={"video": ["av"], "deploy": DEPLOY, "test": ["pytest", "pytest-benchmark", "av"] + DEPLOY},
    entry_points={"console_scripts": ["gtpt=gtpt.cli:main"]},
    license="MIT",
)
