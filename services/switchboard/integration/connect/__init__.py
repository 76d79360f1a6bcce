"""Reaching integrations: which kind speaks to which record, this process's connections
behind their breakers, and health probes (the connector interface is ``ports/``)."""
