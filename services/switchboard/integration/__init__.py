"""The IntegrationService: external services, health, circuit breaking and tools."""
