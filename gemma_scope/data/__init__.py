"""Text corpus and token pipeline."""
