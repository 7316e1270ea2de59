"""Accounts and money: who may render, and what it costs them.

Tenants, users and API keys (`users`), the credit ledger (`ledger`), prices
(`pricing`), history and usage reads (`history`), and what operators see and do
(`admin`). Imports the platform modules and `shared.scheduling` (a weight change
refreshes a tenant's queue).
"""
