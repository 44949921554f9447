"""crossinit: Cross Initialization face identities for Stable Diffusion, as a library and a CLI."""

__version__ = "0.1.0"
