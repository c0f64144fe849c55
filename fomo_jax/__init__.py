"""fomo_jax: continual multimodal pretraining in JAX/Flax."""

__version__ = "0.1.0"
