"""The DNS side: a packet's path from socket to answer, in the order a packet meets it.

`listeners` (UDP/TCP sockets) -> `admission` (ACL, rate limits) -> `identity` (who is asking) ->
`pipeline` (the per-query decision: `local_answers`, `portal_address`, `sinkhole`, `cache`,
`cloaking`) -> `forwarding` (a miss goes upstream) -> `upstreams` (which server, which transport) ->
`cname_chains` (finishing what an upstream left short). `message` is dnslib for rare packets;
`tally` and `counts` are the plain counters the hot path increments.

May import: the shared base (dnsgate/*.py), dnsgate.rules' catalog and lists, dnsgate.consent.
Never imports observe, http, workers, app or cli: those are built on top of it.
"""
