"""Images as 8-bit RGB, as the reference's `Image.open(path).convert("RGB")` gives them (PIL and numpy only).

Kept free of the model stack (`preprocess.py` imports the CLIP preprocessing, hence transformers and torch:
~10 s and ~400 MB), so that `data build` starts fast and stays small.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

# PIL modes holding more than 8 bits per sample. PIL's own convert("RGB") clips them at 255 (a 16-bit
# grayscale image turns almost white), so they are rescaled from the 16-bit range instead.
WIDE_INT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


def to_rgb(image: Image.Image) -> Image.Image:
    """The image as 8-bit RGB, as the reference's `Image.open(path).convert("RGB")` gives it.

    Exceptions to plain `convert("RGB")`: 16-bit/32-bit integer grayscale is scaled by 1/257 (65535 -> 255)
    rather than clipped. Alpha is dropped without compositing and EXIF orientation is ignored, as in the
    reference and `CLIPImageProcessor`. Raises ValueError for modes with no defined 8-bit meaning (float "F").
    """
    if image.mode == "RGB":
        return image
    if image.mode in WIDE_INT_MODES:
        gray = np.asarray(image, np.float64) / 257.0
        return Image.fromarray(np.clip(np.rint(gray), 0, 255).astype(np.uint8), "L").convert("RGB")
    if image.mode == "F":
        raise ValueError("floating-point images (PIL mode F) have no defined 8-bit range")
    return image.convert("RGB")
