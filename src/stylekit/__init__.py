"""stylekit: batch image and video stylization and texture synthesis with few-step diffusion."""

__version__ = "0.1.0"
