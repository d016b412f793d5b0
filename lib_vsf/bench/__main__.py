"""`python -m lib_vsf.bench`."""
from .runner import main

raise SystemExit(main())
