"""The loop's parts, each a small module with its config: optimizer, LR schedule, checkpoint, metrics."""
