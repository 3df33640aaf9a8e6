"""PG-GAN on Ray: progressive growing of GANs (Karras et al., ICLR 2018) as a distributed, resumable service."""

__version__ = "0.1.0"
