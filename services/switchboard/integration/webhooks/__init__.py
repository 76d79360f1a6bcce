"""Webhook deliveries: every event of a workspace, signed, to each subscribed endpoint,
with the feeder's cursor and the delivery rows."""
