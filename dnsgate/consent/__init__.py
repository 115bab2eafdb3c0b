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

from dnsgate.lazy_imports import defer

# sqlite-utils, the SQLite store's library, imports python-dateutil's parser at start for a recipe
# of its command line that dnsgate never runs (~1.5 MiB in every serving process): loaded on use.
defer("dateutil.parser")
