"""Agent sessions: the agent loop, tools, agent-to-agent messaging."""
