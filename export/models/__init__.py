"""The example models that `export` turns into archives: one module per model."""
