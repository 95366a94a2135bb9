"""``python -m pyovpn`` is the same program as the ``pyovpn`` console script."""

from pyovpn.cli import main

raise SystemExit(main())
