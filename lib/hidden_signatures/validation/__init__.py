"""Synthetic ground truth: planted shared and exclusive features, and how well crosscoders recover them."""
