import os
import sys

# Import the binding from this checkout (bindings/python), whatever the working directory.
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))
