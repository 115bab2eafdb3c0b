"""Consent: who chose what, how a change is made durable and put in force, and what a person was told.

`model` (choices, profiles, the in-memory table the hot path reads), `service` (changing consent:
persist first, then apply), `records` (what the consent log is made of, whatever keeps it),
`backend` (the storage protocol), `sqlite_store` and `redis_store` (the two stores behind it),
`migrate` (copying between them), `export` (the consent log as
JSON/CSV), `notice` (what a person is told, and its hash), `pairing` (an HTTP caller and the other
identities of its device).

May import: the shared base and dnsgate.rules' catalog. Never imports dns, observe, http, workers,
app or cli.
"""
