"""Tests of dispatcher/budgets/."""
