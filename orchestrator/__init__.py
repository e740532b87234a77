"""The orchestrator: task graphs, the scheduler, the supervisor, the journal and the CLI."""
