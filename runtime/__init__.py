"""Model, trainer loop, optimizer, data, checkpoints and metrics: no rank logic in the model."""
