"""Image-prompted generation: request -> conditioning (text, image prompt) -> one compiled sampling loop."""

from ipadapter_jax.pipelines.images import image_grid
from ipadapter_jax.pipelines.pipeline import GenerationOutput, IPAdapterPipeline

__all__ = ["GenerationOutput", "IPAdapterPipeline", "image_grid"]
