"""RGB images -> the pixel tensor SigLIP expects, exactly as transformers' Gemma3ImageProcessor makes it.

Each image is resized to the model's square size with Pillow's bilinear filter (transformers' PIL
path: the one it takes without torchvision), rescaled by 1/255 in float64 then cast to float32, and
normalised per channel with mean and std 0.5 (values in [-1, 1]). Optional pan-and-scan (Gemma 3's
answer to wide or tall images) also cuts the original into 2-4 equal crops along its long side, each
processed like a separate image after the full view.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from medgem.errors import ConfigError


@dataclass
class ImageProcessor:
    """Field names and defaults follow a MedGemma preprocessor_config.json (Gemma3ImageProcessor)."""

    size: int = 896
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    resample: int = Image.Resampling.BILINEAR
    do_pan_and_scan: bool = False
    pan_and_scan_min_crop_size: int = 256
    pan_and_scan_max_num_crops: int = 4
    pan_and_scan_min_ratio_to_activate: float = 1.2

    @classmethod
    def from_preprocessor_config(cls, d: dict[str, Any], size: int) -> ImageProcessor:
        """From preprocessor_config.json; `size` (the vision tower's) fills in and must agree."""
        given = d.get("size") or {}
        height, width = given.get("height", size), given.get("width", size)
        if not height == width == size:
            raise ConfigError(f"preprocessor_config.json resizes to {height}x{width}; the vision tower takes {size}x{size}")
        kwargs = {k: d[k] for k in cls.__dataclass_fields__ if k != "size" and d.get(k) is not None}
        for key in ("image_mean", "image_std"):
            if key in kwargs:
                kwargs[key] = tuple(kwargs[key]) if isinstance(kwargs[key], list) else (kwargs[key],) * 3
        return cls(size=size, **kwargs)

    def pan_and_scan(self, image: np.ndarray) -> list[np.ndarray]:
        """Equal crops of an [H, W, 3] array along its long side, or [] when the image is square enough.

        The crop count is the aspect ratio rounded half up, at least 2, at most the configured maximum,
        and never so many that a crop falls under the minimum crop size.
        """
        height, width = image.shape[:2]
        long_side, short_side = max(height, width), min(height, width)
        if long_side / short_side < self.pan_and_scan_min_ratio_to_activate:
            return []
        crops = min(math.floor(long_side / short_side + 0.5), math.floor(long_side / self.pan_and_scan_min_crop_size))
        crops = min(self.pan_and_scan_max_num_crops, max(2, crops))
        across, down = (crops, 1) if width >= height else (1, crops)
        crop_w, crop_h = math.ceil(width / across), math.ceil(height / down)
        if min(crop_w, crop_h) < self.pan_and_scan_min_crop_size:
            return []
        return [
            image[top : top + crop_h, left : left + crop_w]
            for top in range(0, crop_h * down, crop_h)
            for left in range(0, crop_w * across, crop_w)
        ]

    def to_pixels(self, image: np.ndarray) -> np.ndarray:
        """[H, W, 3] uint8 -> [3, size, size] float32, normalised."""
        resized = Image.fromarray(np.ascontiguousarray(image)).resize((self.size, self.size), resample=self.resample)
        chw = np.asarray(resized).transpose(2, 0, 1)
        scaled = (chw.astype(np.float64) * self.rescale_factor).astype(np.float32)
        mean = np.asarray(self.image_mean, dtype=np.float32)[:, None, None]
        std = np.asarray(self.image_std, dtype=np.float32)[:, None, None]
        return (scaled - mean) / std

    def __call__(self, images: list[Image.Image]) -> tuple[torch.Tensor, list[int]]:
        """(pixel_values [views, 3, size, size], crops per image). Each image contributes its full view,
        then its pan-and-scan crops. Images must already be RGB (see medgem.inputs.images.load_image)."""
        views, num_crops = [], []
        for image in images:
            array = np.asarray(image)
            crops = self.pan_and_scan(array) if self.do_pan_and_scan else []
            views += [self.to_pixels(v) for v in (array, *crops)]
            num_crops.append(len(crops))
        return torch.from_numpy(np.stack(views)), num_crops
