"""The names of the choices users make on command lines and in configs, importable without jax or the models.

The library modules that implement each choice import their names from here, and so do the CLIs (which stay fast
to start) and the training config's validation: one list per choice.
"""

# The UNet's attention kernels (`ipadapter_jax.models.unet.Attention`).
ATTENTION_IMPLEMENTATIONS = ("diffusers", "xla", "cudnn", "splash")

# Sampling schedulers of the loaders and CLIs -> scheduler kinds
# (`ipadapter_jax.models.schedulers.SCHEDULERS`: diffusers' DDIM, DPM-Solver++ multistep and Euler).
SCHEDULERS = {"ddim": "ddim", "dpm-solver++": "dpm_solver_multistep", "euler": "euler"}

# IP-Adapter kinds: which image features the projection reads and how it makes tokens
# (`ipadapter_jax.models.image_proj`); the FaceID kinds read an identity embedding (Plus: and CLIP hidden states).
ADAPTER_KINDS = ("base", "plus", "full", "faceid", "faceid-plus")

# Adapter designs: what an adapter trains beside its projection and what attn2 does with the image tokens
# (`ipadapter_jax.models.designs.DESIGNS`): the paper's decoupled cross-attention, its "simple adapter" (image tokens
# appended to the text tokens) and gated image attention.
ADAPTER_DESIGNS = ("decoupled", "simple", "gated")

# Computation dtypes (params stay float32).
DTYPES = ("float32", "bfloat16", "float16")

# How the training target image is cropped to a square after its shortest side is resized
# (`ipadapter_jax.data.preprocess.target_image`): torchvision's CenterCrop (tutorial_train.py, SD1.5), the
# SDXL tutorial's floor-centred crop (tutorial_train_sdxl.py's default) or its random crop.
TARGET_CROPS = ("center", "center_floor", "random")

# Named per-layer IP-Adapter scale presets (`ipadapter_jax.models.scale_presets`): ComfyUI_IPAdapter_plus's weight
# types (its names with "-" for " ") and InstantStyle's style / style+layout blocks.
WEIGHT_TYPES = (
    "linear",
    "ease-in",
    "ease-out",
    "ease-in-out",
    "reverse-in-out",
    "weak-input",
    "weak-output",
    "weak-middle",
    "strong-middle",
    "style-transfer",
    "composition",
    "strong-style-transfer",
    "style-and-composition",
    "strong-style-and-composition",
    "style-transfer-precise",
    "composition-precise",
    "instantstyle-style",
    "instantstyle-style-layout",
)

# How several images of one image prompt become the adapter's input (`ipadapter_jax.pipelines.image_combine`).
IMAGE_COMBINE_MODES = ("concat", "add", "subtract", "average", "norm-average")

# How an adapter's IP weight enters its attention (`ipadapter_jax.models.ip_attention`): the output only (the
# paper's and diffusers'), or keys and values after cubiq/ComfyUI_IPAdapter_plus's `embeds_scaling`.
EMBEDS_SCALING = ("v_only", "k_v", "k_v_c_penalty", "k_mean_v_c_penalty")
