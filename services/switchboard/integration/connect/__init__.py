"""Reaching integrations: the connector interface, which kind speaks to which record,
this process's connections behind their breakers, and health probes."""
