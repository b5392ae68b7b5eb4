"""The NextStep model family: architecture, checkpoint loading, samplers, VAE and the reference generator."""
