from saelab.cli import main

raise SystemExit(main())
