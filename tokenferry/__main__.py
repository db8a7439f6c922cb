from tokenferry.cli.main import main

raise SystemExit(main())
