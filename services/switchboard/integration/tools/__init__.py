"""Tools an integration offers: listing and calling them, and their input schemas."""
