from grym.cli import main

raise SystemExit(main())
