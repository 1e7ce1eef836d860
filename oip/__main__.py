"""`python -m oip`: the Open Inference Protocol front end (oip/server.py)."""
from oip.server import main

if __name__ == "__main__":
    raise SystemExit(main())
