"""torch.library op definitions, one module per family."""
