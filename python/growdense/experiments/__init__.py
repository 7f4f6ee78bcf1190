"""Experiments: the reproduction of the growing-VAE study (needs the ``experiments`` extra:
torchvision, matplotlib, tqdm)."""
