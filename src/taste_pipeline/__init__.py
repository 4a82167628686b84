"""taste-pipeline: text-aligned speech tokenization (TASTE, arXiv 2504.07053) as a DVC pipeline."""
