"""peftx: parameter-efficient fine-tuning of timm vision transformers, merged and exported for the edge."""

__version__ = "0.1.0"
