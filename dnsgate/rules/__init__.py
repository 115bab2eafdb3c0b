"""The rules dnsgate gates on: the vendor catalog, imported lists, and the ruleset a reload swaps in.

`catalog` and the lists (`blocklists`, `list_sources`) sit low: consent and DNS read them.
`ruleset` (everything a reload replaces) and `reload` (building it off to the side) sit above dns and
consent, since a ruleset carries a TTL policy, a sinkhole and a notice.
"""
