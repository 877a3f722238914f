"""Writers of compiled artifacts: one module per format."""
