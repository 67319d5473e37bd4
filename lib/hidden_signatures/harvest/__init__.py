"""Activations: the nnsight harvest of residual streams into an on-disk store, read back as row-paired batches."""
