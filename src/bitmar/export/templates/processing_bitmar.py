"""Processor of an exported BitMar model: the BPE tokenizer for text, DINOv2's image processor for pictures.

`AutoProcessor.from_pretrained(dir, trust_remote_code=True)` returns a `BitMarProcessor`. Text goes through the
tokenizer unchanged (BOS is prepended, extra tokenizer arguments such as `return_offsets_mapping` pass through);
pictures become `pixel_values` (resize 256, center crop 224, ImageNet mean/std: DINOv2's preprocessing), which the
model turns into DINOv2 CLS features when the export holds a vision backbone.
"""

from __future__ import annotations

from typing import Any

from transformers import BatchFeature, ProcessorMixin

_IMAGE_KWARGS = ("do_resize", "size", "resample", "do_center_crop", "crop_size", "do_normalize", "do_rescale")


class BitMarProcessor(ProcessorMixin):
    # Class-level names for transformers 4.x; 5.x reads the same information from the __init__ signature.
    attributes = ["image_processor", "tokenizer"]
    image_processor_class = "AutoImageProcessor"
    tokenizer_class = "AutoTokenizer"

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, **kwargs: Any) -> None:
        super().__init__(image_processor, tokenizer, **kwargs)

    def __call__(
        self,
        text: str | list[str] | None = None,
        images: Any = None,
        return_tensors: str | None = None,
        **kwargs: Any,
    ) -> BatchFeature:
        """Tokenize `text` (tokenizer arguments pass through) and/or preprocess `images` into `pixel_values`."""
        if text is None and images is None:
            raise ValueError("BitMarProcessor needs text, images or both")
        image_kwargs = {key: kwargs.pop(key) for key in _IMAGE_KWARGS if key in kwargs}
        data: dict[str, Any] = {}
        if text is not None:
            data.update(self.tokenizer(text, return_tensors=return_tensors, **kwargs))
        if images is not None:
            pixels = self.image_processor(images, return_tensors=return_tensors, **image_kwargs)
            data["pixel_values"] = pixels["pixel_values"]
        return BatchFeature(data=data, tensor_type=return_tensors)

    def batch_decode(self, *args: Any, **kwargs: Any) -> list[str]:
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args: Any, **kwargs: Any) -> str:
        return self.tokenizer.decode(*args, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values"]
