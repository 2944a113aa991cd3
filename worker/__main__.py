import os
import sys

from .cli import main

code = main()
# Served and closed (or refused to start, its line printed): the interpreter's teardown would only
# free the model and modules piece by piece, 30-70 ms that the coordinator waits through to reap us.
sys.stdout.flush()
sys.stderr.flush()
os._exit(code)
