"""functional_seg: semantic segmentation in a pure-functional, JAX-like style on torch.func."""

__version__ = "0.1.0"
