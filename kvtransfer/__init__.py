"""pdserve kvtransfer package."""
