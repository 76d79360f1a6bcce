"""Tests of dispatcher/budgets/resources/."""
