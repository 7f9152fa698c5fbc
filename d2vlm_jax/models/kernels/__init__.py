"""Attention kernels behind :func:`d2vlm_jax.models.attention.dot_product_attention`:
Pallas splash attention (TPU) and cuDNN flash attention (GPU)."""
