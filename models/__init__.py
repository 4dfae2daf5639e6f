"""pdserve models package."""
