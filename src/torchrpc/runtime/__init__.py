"""The runtime: the parts one worker process needs, one concern each (see the agent for how they are wired)."""
