"""The agent card: the servicer of the card contract and the public card at
``/.well-known/agent-card.json``."""
