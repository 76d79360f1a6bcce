"""Budgets and quotas: caps on what runs spend, held by reservations in the database."""
