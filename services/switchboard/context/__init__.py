"""The ContextService: workspaces, conversations, messages, memory and context windows."""
