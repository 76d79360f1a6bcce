"""The model handler: a run answered by an OpenAI-compatible model, with tools."""
