from compact.cli import main

raise SystemExit(main())
