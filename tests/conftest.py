import os

# Workers started by tests run eager: compiling decode graphs costs seconds per worker start,
# and most tests start several. The tests that cover compiled workers clear this.
os.environ.setdefault("PDSERVE_ENFORCE_EAGER", "1")
