"""`python3 -m utils.curves RUN_DIR`, the documented command that redraws a run's curves.png: a thin entry point.

The plotting itself is part of the training engine: `engine/curves.py` (`python3 -m engine.curves RUN_DIR` is the same).
"""
import sys

if __name__ == "__main__":
    from engine.curves import main
    sys.exit(main())
