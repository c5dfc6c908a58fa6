"""`python -m kernel_agent`: the agent daemon (same as `kcp agent` and `kcp-agent`)."""

from kernel_agent.agent.main import main

raise SystemExit(main())
