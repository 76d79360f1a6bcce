"""Tests of integration/webhooks/."""
