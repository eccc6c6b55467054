"""msrnn_jax: transformers as multi-state RNNs, and TOVA, in pure JAX."""
