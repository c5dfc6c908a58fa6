from kernel_agent.kernel.main import main

raise SystemExit(main())
