"""The classifier and its parts: the family table, the encoder paths, attention, the head, loading, and the
run folder's transformers layout."""
