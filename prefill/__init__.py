"""pdserve prefill package."""
