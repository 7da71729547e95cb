from posetune.cli import main

raise SystemExit(main())
