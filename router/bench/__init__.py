"""``pdserve bench``: the load test (arrivals, workload, load generator, metrics, report).

Torch-free: it talks to the server only through ``router.client``.
"""
