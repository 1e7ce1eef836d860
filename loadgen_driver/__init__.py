"""loadgen_driver package."""
