"""Deployment: Envoy's configuration, the development certificate, the mesh launcher."""
