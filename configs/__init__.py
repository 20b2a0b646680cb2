"""The experiment runner's Hydra configs, shipped as package ``flex_pbs.configs``."""
