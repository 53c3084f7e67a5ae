"""API keys and scopes: who may charge or read which budgets."""
