"""Budgets as resources: the catalog (CreateBudget to DeleteBudget), their SQL (with the
usage sums QueryUsage reads), their messages and events, and a budget's periods, which
the ledger keys its windows by."""
