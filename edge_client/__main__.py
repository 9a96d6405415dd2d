import sys

from edge_client.agent_cli import main

sys.exit(main())
