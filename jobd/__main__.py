"""`python -m jobd` and the zipapp entry point."""

from __future__ import annotations

from jobd.cli import main

if __name__ == "__main__":
    main()
