"""The default training config: the reference recipe (REFERENCE.md s.3) for a base IP-Adapter on SD1.5.

AdamW lr 1e-4, weight decay 1e-2, constant LR, no clipping, no EMA, epsilon loss, condition drops 5/5/5%,
512 px, batch 8 per device. Presets (the other files here) start from `get_config()` and override fields;
`ipadapter_jax.training.config` documents and validates every field.
"""

from __future__ import annotations

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.base = ""  # diffusers model folder (unet/, vae/, text_encoder[_2]/, tokenizer[_2]/, scheduler/), or "tiny"
    c.model.weights_variant = ""  # diffusers weight-file variant of the base folder, e.g. "fp16"; "" = the plain files
    c.model.image_encoder = ""  # CLIPVisionModelWithProjection folder (ViT-H/14 for SD1.5, bigG for SDXL), or "tiny"
    # The published shapes ("sd15" | "sdxl": UNet, VAE, text encoders, image encoder ViT-H/14 | bigG/14,
    # `ipadapter_jax.weights.known_models`) used where model.base / model.image_encoder are not given
    # (`ipadapter-jax plan` compiles a preset without weights); a given folder's config.json files win.
    c.model.architecture = "sd15"
    c.model.adapter_kind = "base"  # "base" (tokens from image_embeds) | "plus" (Resampler over hidden_states[-2])
    c.model.num_tokens = 4
    # "faceid" (tokens from a per-example identity embedding, the dataset's face_embeds) | "faceid-plus" (those
    # tokens refined by a resampler over the CLIP hidden_states[-2]); FaceID adapters train no UNet LoRA
    c.model.face_embed_dim = 512  # FaceID kinds: the identity embedding's width D (ArcFace: 512); the data's must match
    c.model.faceid_shortcut_scale = 0.0  # "faceid-plus": 0 = v1; > 0 = v2's shortcut with this s_scale
    # The adapter design (`ipadapter_jax.models.designs`): "decoupled" (the paper's decoupled cross-attention, the
    # official files' layout) | "simple" (image tokens appended to the text tokens, projection trained only) |
    # "gated" (the decoupled branch through a learned tanh gate, initialised at 0). Designs other than "decoupled"
    # export ip-adapter.msgpack (no official layout).
    c.model.design = "decoupled"
    # The Plus Resampler's width (0: the reference's, 768 for SD1.5's cross-attention, else 1280; else a multiple of
    # its head size 64) and depth (the reference's 4). The tiny ablations use a 64-wide, 1-deep one.
    c.model.resampler_width = 0
    c.model.resampler_depth = 4
    c.model.init_adapter = ""  # optional official .bin/.safetensors (or our .msgpack) to start from (fine-tuning)
    c.model.prediction_type = "epsilon"  # "v_prediction" for SD2-768-style bases
    c.model.dtype = "bfloat16"  # compute dtype; params and optimizer state stay float32
    c.model.remat = False  # rematerialise UNet activations in the backward pass (less memory, ~30% more compute)
    # diffusers' chunked attention (Rabe & Staats, 2021): the (heads, L, L) self-attention scores are never held
    # whole (SD1.5 at 512 px: 4096 tokens, 0.5 GB per example in fp32). Same step to 1e-5.
    c.model.memory_efficient_attention = False
    # The UNet's attention kernel (`ipadapter_jax.models.unet.Attention`): "diffusers" (its einsum attention, or the
    # chunked one above), "xla" (jax.nn.dot_product_attention) or "cudnn" (cuDNN flash attention: NVIDIA GPUs,
    # bf16; on an H200 1.57x the default's images/s with a third of its memory, bench/train_bench.py --gpu).
    # On TPUs: "splash" (Pallas splash attention; SD1.5 512 px, batch 8/chip, bf16 on v5e: 9.0 GiB per chip, 44%
    # headroom, by `ipadapter-jax plan`; the default needs 13.9 GiB there).
    c.model.attention_implementation = "diffusers"
    # The UNet computes as diffusers' PyTorch UNet (exact GELU, GroupNorm epsilon 1e-6 in Transformer2D), so the
    # weights trained here behave the same in PyTorch; False: as diffusers' Flax UNet (~6e-5 relative apart).
    c.model.pytorch_numerics = True

    c.data = ml_collections.ConfigDict()
    c.data.path = ""  # built TFDS dataset dir or embedding cache dir (`ipadapter-jax data build` / `cache`)
    c.data.resolution = 512
    c.data.batch_size_per_device = 8
    c.data.num_workers = 0  # grain worker processes per host
    c.data.drop_rates = (0.05, 0.05, 0.05)  # image only, text only, both
    # The target's square crop after the shortest-side resize: "center" (torchvision's CenterCrop, as
    # tutorial_train.py), "center_floor" (tutorial_train_sdxl.py's default) or "random" (its random crop, a new one
    # every epoch; SDXL sees the offsets as time ids; raw datasets only, not embedding caches).
    c.data.crop = "center"
    # The data order's and condition drops' seed; -1: `seed` (which also seeds the adapter's init and the step's
    # noise). Runs that differ only in `seed` with data.seed fixed see the same batches (`ipadapter-jax ablate`).
    c.data.seed = -1
    c.data.eval_path = ""  # optional held-out dataset: its first global batch is scored every eval_every steps

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-4
    c.optim.weight_decay = 1e-2
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.warmup_steps = 0
    c.optim.grad_clip_norm = 0.0  # 0 = off (reference)
    c.optim.grad_accum_steps = 1

    c.loss = ml_collections.ConfigDict()
    c.loss.noise_offset = 0.0
    c.loss.snr_gamma = 0.0  # 0 = plain MSE (reference); 5.0 = min-SNR weighting

    c.ema_decay = 0.0  # 0 = no EMA (reference)

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1: all devices not used by fsdp
    c.mesh.fsdp = 1
    c.mesh.fsdp_min_size = 2**14  # params with fewer elements stay replicated (all-gathers cost more)
    # Placement of every array of the run: the first rule whose regex matches a path ("state/adapter/...",
    # "state/opt_state/...", "frozen/unet/...", "frozen/encoders/...") gives "fsdp" (split the largest axis that the
    # fsdp axis divides), "replicate", or a PartitionSpec as a tuple of axis names. With mesh.fsdp = 1 "fsdp" is
    # replication. Default: the trained state FSDP-split, the frozen models replicated.
    c.sharding_rules = (("^frozen/", "replicate"), (".*", "fsdp"))

    c.total_steps = 1_000_000
    c.log_every = 50
    c.eval_every = 500  # held-out loss (fixed noise and timesteps) when data.eval_path is set
    c.checkpoint_every = 1000
    c.keep_checkpoints = 3
    c.export_every = 10_000  # .safetensors in the official layout, loadable by diffusers' load_ip_adapter
    c.on_nonfinite = "stop"  # "stop": checkpoint the last good state and exit with an error; "skip"
    c.profile_steps = ()  # (first, last) step range traced with jax.profiler into workdir/profile
    # TensorBoard event files in workdir/tensorboard (process 0; tensorboardX, no TensorFlow): every metrics.jsonl
    # record as scalars (train/loss, train/learning_rate, train/grad_norm, perf/images_per_s, perf/mfu, eval/loss, ...)
    c.tensorboard = True
    # ... and every samples.every steps (0 = never; e.g. eval_every) a grid of samples of the current adapter for fixed
    # image prompts: samples.images (files, local or gs://) or the first samples.count images of the raw dataset
    # (eval_path, else data.path, else the raw dataset of the embedding cache). Loads the base model a second time.
    c.samples = ml_collections.ConfigDict()
    c.samples.every = 0
    c.samples.images = ()
    c.samples.count = 4
    c.samples.per_prompt = 2  # samples per image prompt (seeds 0..count-1, the same at every grid)
    c.samples.steps = 20  # DDIM steps
    c.samples.guidance_scale = 5.0
    c.samples.scale = 1.0  # IP-Adapter scale
    return c
