"""A toy world with known ground truth and a tiny SD-shaped base model pretrained on it (issue #4)."""
