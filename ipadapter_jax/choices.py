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
# (`ipadapter_jax.models.image_proj`).
ADAPTER_KINDS = ("base", "plus", "full")

# Computation dtypes (params stay float32).
DTYPES = ("float32", "bfloat16", "float16")

# How an adapter's IP weight enters its attention (`ipadapter_jax.models.ip_attention`): the output only (the
# paper's and diffusers'), or keys and values after cubiq/ComfyUI_IPAdapter_plus's `embeds_scaling`.
EMBEDS_SCALING = ("v_only", "k_v", "k_v_c_penalty", "k_mean_v_c_penalty")
