"""The text side of a run: the corpus and its parts, and token alignment across two tokenizers."""
