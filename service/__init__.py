"""The VAE model service: a FastAPI app over TorchScript artifacts in a model store."""
