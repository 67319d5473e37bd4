"""The models compared: loading by spec, and the made models (fine-tune, distillation) with their shared LM training loop."""
