"""dns.workers > 1: the primary's side of its worker processes (`supervisor`), the line to each
(`link`), the data dir's record of them (`record`), and what keeps a worker's consent table equal to
the primary's (`replica`).

May import everything below app and cli.
"""
