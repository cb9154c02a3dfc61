from hybridroute.cli import main

raise SystemExit(main())
