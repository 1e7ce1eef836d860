"""prepare package."""
