"""Train the new classification layer on cached fc7 features."""
