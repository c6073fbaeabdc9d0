"""Model code: plain PyTorch that reads like the papers. Blocks say which submodules they have;
a LayerSpec (spec.py) says which implementation fills each linear (dense TP now)."""
from pretrain.models.network import Network, Payload, build_network

__all__ = ["Network", "Payload", "build_network"]
