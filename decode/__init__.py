"""pdserve decode package."""
