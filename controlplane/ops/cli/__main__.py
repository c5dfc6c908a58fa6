from controlplane.ops.cli.main import main

raise SystemExit(main())
