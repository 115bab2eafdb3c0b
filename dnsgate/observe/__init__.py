"""Seeing what the gate did, off the hot path: the query log, metrics, live events, the evidence
report, and the dashboard's numbers.

May import: the shared base, rules, consent, dns. Never imports http, workers, app or cli.
"""
