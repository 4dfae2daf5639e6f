"""``python -m router.bench``: the load test without the ``pdserve`` entry point."""
import argparse
import sys

from router.bench import main

parser = argparse.ArgumentParser(prog="python -m router.bench", description=main.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
main.add_arguments(parser)
sys.exit(main.run(parser.parse_args()))
