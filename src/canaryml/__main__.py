from canaryml.cli import main

raise SystemExit(main())
