"""The worker runtime both roles share: options, the TP group, the step loop, step plans."""
