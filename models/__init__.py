"""What training and serving share: the Flux-style transformer, the autoencoder, the text encoder,
the rectified-flow schedule, samplers and the checkpoint format."""
