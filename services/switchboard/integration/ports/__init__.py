"""What every kind of integration is spoken to through: the connector interface and the
tool input schemas, below the kinds that implement them."""
