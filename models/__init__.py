"""Image models: volume loading, segmentation, severity, CT phantoms."""
