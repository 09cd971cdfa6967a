"""ubsmoe: resource-adaptive federated fine-tuning with a Universally Balanced Sparse MoE (UB-SMoE)."""

__version__ = "0.1.0"
