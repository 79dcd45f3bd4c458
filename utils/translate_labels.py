#!/usr/bin/env python3
"""`python3 utils/translate_labels.py`, the release's command for GTA5's labels: a thin entry point.

The tool itself is a dataset tool and lives with the data: `data/translate_labels.py` (its docstring gives the flags).
"""
import os
import sys

if __name__ == "__main__":
    _here = os.path.dirname(os.path.abspath(__file__))  # import from the repository root, not utils/
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    sys.path.insert(0, os.path.dirname(_here))
    from data.translate_labels import main
    sys.exit(main())
