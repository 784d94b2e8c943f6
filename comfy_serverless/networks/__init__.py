"""The Stable Diffusion networks as lean PyTorch nn.Modules (UNet, VAE, CLIP text encoders) and how to build them."""
